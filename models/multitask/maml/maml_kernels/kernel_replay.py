"""Benchmark support: record the native convolution calls of a meta-iteration, then replay them bare.

tools/benchmark.py reports which share of an iteration the convolution kernels take (the plugin's
kernel_seconds): the rest is overhead around them. While `recording_convolutions()` is active, every
convolution call of double_grad_ops.py is noted (kernel, argument shapes, settings, split plan), and
`replay_seconds` runs the same calls on random inputs, split and threaded as they were.
"""
import time

import paddle

from . import cpu_schedule

_calls = None  # the list being recorded into, while a recording_convolutions() is active

_KERNELS = {"conv2d": cpu_schedule.conv2d, "conv2d_grad": cpu_schedule.conv2d_grad,
            "conv2d_weight_grad_of_blocked": cpu_schedule.conv2d_weight_grad_of_blocked}


def record(kind, tensors, conv, plan):
    """Note one native call (kind in _KERNELS) while a recording is active; nothing otherwise."""
    if _calls is not None:
        _calls.append((kind, [t.shape for t in tensors], conv, plan))


class recording_convolutions:
    """Context manager collecting the native convolution calls made inside it (a list of records)."""

    def __enter__(self):
        global _calls
        _calls = self.calls = []
        return self.calls

    def __exit__(self, *exc):
        global _calls
        _calls = None


def replay_seconds(calls, dtype, repeats=3):
    """Median wall time of running the recorded convolution kernels bare, on random inputs."""
    # One random tensor per distinct shape, shared by the calls that take that shape (the chunks of a
    # meta-batch repeat the same shapes): the replay's own memory then stays near one chunk's, instead of
    # holding every call's inputs at once and inflating the peak memory the benchmark reports.
    pool = {}

    def tensor(shape):
        key = tuple(shape)
        if key not in pool:
            pool[key] = paddle.randn(list(shape), dtype=dtype)
        return pool[key]

    inputs = [[tensor(shape) for shape in shapes] for _, shapes, _, _ in calls]
    times = []
    for _ in range(repeats + 1):  # the first round warms up
        start = time.perf_counter()
        for (kind, _, conv, plan), tensors in zip(calls, inputs):
            _KERNELS[kind](*tensors, conv, plan)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]

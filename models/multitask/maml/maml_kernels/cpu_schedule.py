"""How the model's native kernels use a CPU, and the process settings the model wants on a CPU.

- Two threads per convolution (and per large max-pool): Paddle's CPU convolution runs on one core (its
  im2col + small GEMMs do not use MKL's threads), and the machines this was tuned on have two. One native
  call is cut in two independent halves run at once: one in a worker thread (Paddle releases the GIL inside
  kernels, and ctypes inside oneDNN's), one in the calling thread. CPU tensors only: a GPU kernel is
  parallel already. oneDNN's convolutions (onednn_conv.py) are split the same way, one OpenMP thread per
  half, which measured faster than oneDNN's own two threads on the whole call (doc/performance.md).
- MKL's per-thread thread count, so that each half runs its GEMMs on one thread (ctypes into Paddle's
  bundled libmklml_intel.so).
- prepare_cpu_process(): glibc's allocator keeps large freed buffers (mallopt), and on CPUs whose vendor
  Paddle's bundled MKL does not recognise, it takes its AVX2 path (MKL_DEBUG_CPU_TYPE). The plugin calls it once, when it is imported, so the
  model is as fast under PaddleRec's tools or a user's own loop as under ours.

None of this changes a formula: the halves see detached tensors (every derivative goes through the PyLayers
of double_grad_ops.py), and only the float rounding of a weight gradient summed from two halves differs.
"""
import concurrent.futures
import ctypes
import os
import sys

import paddle

from . import native_kernels as kernels

class BadVariable(ValueError):
    """An environment variable this engine reads has a value it cannot use: `name`, and what is wrong."""

    def __init__(self, name, message):
        super().__init__(f"{name}: {message}")
        self.name, self.message = name, message


_conv_threads = None


def conv_threads():
    """Threads a native call on a CPU tensor is split over: MAML_CONV_THREADS, default min(2, CPUs). 1 turns the
    splitting off (e.g. two data-parallel ranks on two cores); values above 2 act as 2 (there are two halves).
    Read at the first call, not at import, so that a bad value is one error naming the variable."""
    global _conv_threads
    if _conv_threads is None:
        raw = os.environ.get("MAML_CONV_THREADS", "").strip()
        if not raw:
            _conv_threads = min(2, os.cpu_count() or 1)
        elif raw.isdigit() and int(raw) >= 1:
            _conv_threads = int(raw)
        else:
            raise BadVariable("MAML_CONV_THREADS", f"environment variable: must be a whole number of threads >= 1 "
                                                   f"(1 turns the two-thread split off), got {raw!r}")
    return _conv_threads
_BATCH_SPLIT_MIN = 8
_executor = None


def _threads_for(x):
    """conv_threads() for a tensor on the CPU; 1 elsewhere (cutting a GPU kernel in halves on Python threads
    would only add copies)."""
    return conv_threads() if x.place.is_cpu_place() else 1


def _mkl_local_threads():
    """MKL's per-thread thread-count setter, or None. Each half of a split convolution must run its GEMMs
    on one thread: with Paddle's CPU threads set to 2 (tools: runner.num_threads 0 = all cores), two
    halves of two MKL threads each oversubscribe two cores and run slower than no split at all."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(paddle.__file__), "libs", "libmklml_intel.so"))
        return lib.MKL_Set_Num_Threads_Local
    except (OSError, AttributeError):
        return None


_set_mkl_local_threads = _mkl_local_threads()


def _single_threaded(fn, *args, **kwargs):
    """fn(*args, **kwargs) with MKL limited to this thread (restored afterwards)."""
    if _set_mkl_local_threads is None:
        return fn(*args, **kwargs)
    previous = _set_mkl_local_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        _set_mkl_local_threads(previous)


def _submit(fn, *args, **kwargs):
    global _executor
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="conv")
    return _executor.submit(_single_threaded, fn, *args, **kwargs)


def split_plan(x, weight, conv, gradient):
    """'batch', 'groups' or None: how to cut one convolution call (conv2d, or conv2d_grad if `gradient`) in two.

    Large batches split on the batch axis (contiguous halves: the forward output and the input gradient are
    joined, the weight gradients added); small plain NCHW batches (the support set) split on the task groups,
    which balances 5 images better than 3 + 2. With one input channel per group (the first layer) a
    convolution does 18 flops per output element, so copying the halves' output together costs more than the
    second core saves; its weight gradient still gains when the batch is large. A task-group half of
    channel-blocked activations (onednn_conv) is a strided channel slice, which oneDNN's fast code does not read
    in place, so each half is copied in and out; against that, an odd number n of images splits unevenly
    (3 + 2 take 3/5 of the one-thread time, not 1/2). Blocked tensors are therefore cut on the task groups only
    where the copies cost less than that imbalance, 1 / (2n) of the one-thread time, their own share falling
    with the input channels per group c: taken as 9 / c (fitted to two measurements, doc/performance.md), and
    where each half is whole channel blocks.
    """
    if _threads_for(x) < 2:
        return None
    n, channels_per_group = x.shape[0], weight.shape[1]
    if channels_per_group < 8 and not (gradient and n >= _BATCH_SPLIT_MIN):
        return None
    if n >= _BATCH_SPLIT_MIN:
        return "batch"
    blocked = len(x.shape) == 5 or conv.block
    groups_pay = not blocked or n == 1 or (n % 2 == 1 and channels_per_group > 18 * n)  # 1 / (2n) > 9 / c
    if conv.groups % 2 == 0 and groups_pay and _halves_whole_blocks(x, weight, conv):
        return "groups"
    return "batch" if n >= 2 else None


def _halves_whole_blocks(x, weight, conv):
    x_block, y_block = len(x.shape) == 5 and x.shape[4], conv.block
    in_half, out_half = x.shape[1] * (x_block or 1) // 2, weight.shape[0] // 2
    return (not x_block or in_half % x_block == 0) and (not y_block or out_half % y_block == 0)


def _channels(t, start, stop):
    """Channels start:stop of a plain or blocked tensor (whole blocks)."""
    if len(t.shape) == 5:
        block = t.shape[4]
        return t[:, start // block:stop // block]
    return t[:, start:stop]


def _halves(x, weight, conv, plan, out_grad=None):
    """The two halves of a call as argument tuples (x, weight, [out_grad,] conv); the axis on which the halves
    of the output and of the input gradient lie; and the size of the first half there (output, input), in
    channels on axis 1."""
    if plan == "batch":
        h = (x.shape[0] + 1) // 2
        parts = [(x[:h], weight), (x[h:], weight)]
        grads = [(out_grad[:h],), (out_grad[h:],)] if out_grad is not None else [(), ()]
        return [p + g + (conv,) for p, g in zip(parts, grads)], 0, h, h
    c_in = x.shape[1] * (x.shape[4] if len(x.shape) == 5 else 1)
    ci, co, half = c_in // 2, weight.shape[0] // 2, conv._replace(groups=conv.groups // 2)
    parts = [(_channels(x, 0, ci), weight[:co]), (_channels(x, ci, c_in), weight[co:])]
    grads = ([(_channels(out_grad, 0, co),), (_channels(out_grad, co, 2 * co),)] if out_grad is not None
             else [(), ()])
    return [p + g + (half,) for p, g in zip(parts, grads)], 1, co, ci


def _cut(t, axis, at):
    if axis == 0:
        return t[:at], t[at:]
    channels = t.shape[1] * (t.shape[4] if len(t.shape) == 5 else 1)
    return _channels(t, 0, at), _channels(t, at, channels)


def _in_place(halves):
    """Whether both halves' kernels write into slices of one tensor the caller gives (no concat)."""
    return all(kernels.writes_in_place(args[0], args[1], args[-1]) for args in halves)


def conv2d(x, weight, conv, plan):
    """native_kernels.conv2d, cut in two halves on two threads as `plan` (split_plan's) says."""
    x, weight = x.detach(), weight.detach()
    if plan is None:
        return kernels.conv2d(x, weight, conv)
    halves, axis, at, _ = _halves(x, weight, conv, plan)
    if _in_place(halves):
        out = paddle.empty(kernels.conv2d_output_tensor_shape(x, weight, conv), dtype=x.dtype)
        first, second = _cut(out, axis, at)
        other = _submit(kernels.conv2d, *halves[1], out=second)
        _single_threaded(kernels.conv2d, *halves[0], out=first)
        other.result()
        return out
    other = _submit(kernels.conv2d, *halves[1])
    return paddle.concat([_single_threaded(kernels.conv2d, *halves[0]), other.result()], axis=axis)


def conv2d_grad(x, weight, out_grad, conv, plan):
    """native_kernels.conv2d_grad, cut in two halves on two threads as `plan` (split_plan's) says. The weight
    gradient of a batch split is the sum of the halves'; of a group split, their concatenation."""
    x, weight, out_grad = x.detach(), weight.detach(), out_grad.detach()
    if plan is None:
        return kernels.conv2d_grad(x, weight, out_grad, conv)
    halves, axis, _, at = _halves(x, weight, conv, plan, out_grad)
    if _in_place(halves):
        dx = paddle.empty(x.shape, dtype=x.dtype)
        dx_parts = _cut(dx, axis, at)
        if plan == "batch":
            dw = None
            dw_parts = (None, None)
        else:
            dw = paddle.empty(weight.shape, dtype=weight.dtype)
            dw_parts = _cut(dw, 0, weight.shape[0] // 2)
        other = _submit(kernels.conv2d_grad, *halves[1], dx=dx_parts[1], dw=dw_parts[1])
        _, dw0 = _single_threaded(kernels.conv2d_grad, *halves[0], dx=dx_parts[0], dw=dw_parts[0])
        _, dw1 = other.result()
        return dx, (dw0 + dw1 if dw is None else dw)
    other = _submit(kernels.conv2d_grad, *halves[1])
    dx0, dw0 = _single_threaded(kernels.conv2d_grad, *halves[0])
    dx1, dw1 = other.result()
    if plan == "batch":
        return paddle.concat([dx0, dx1], axis=0), dw0 + dw1
    return paddle.concat([dx0, dx1], axis=1), paddle.concat([dw0, dw1], axis=0)


def conv2d_weight_grad_of_blocked(x, weight, out_grad, conv, plan):
    """native_kernels.conv2d_weight_grad_of_blocked (of weight's shape), as two batch halves on two threads when
    `plan` is "batch" (split_plan's), their gradients added."""
    x, out_grad = x.detach(), out_grad.detach()
    if plan is None:
        return kernels.conv2d_weight_grad_of_blocked(x, out_grad, conv, weight.shape)
    h = (x.shape[0] + 1) // 2
    other = _submit(kernels.conv2d_weight_grad_of_blocked, x[h:], out_grad[h:], conv, weight.shape)
    return _single_threaded(kernels.conv2d_weight_grad_of_blocked, x[:h], out_grad[:h], conv, weight.shape) + \
        other.result()


def max_pool2x2_with_index(x):
    """native_kernels.max_pool2x2_with_index. Large CPU batches (the query set) run as two batch halves on
    both cores, like the convolutions: the outputs are a quarter of the input, so joining them is cheap."""
    if _threads_for(x) < 2 or x.shape[0] < _BATCH_SPLIT_MIN:
        return kernels.max_pool2x2_with_index(x)
    h = (x.shape[0] + 1) // 2
    other = _submit(kernels.max_pool2x2_with_index, x[h:])
    out0, mask0 = kernels.max_pool2x2_with_index(x[:h])
    out1, mask1 = other.result()
    return paddle.concat([out0, out1], axis=0), paddle.concat([mask0, mask1], axis=0)


# ------------------------------------------------------------------------------------ process settings
# <malloc.h> parameter numbers (glibc); mallopt takes an int, so INT_MAX is the highest threshold it can set.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_INT_MAX = 2 ** 31 - 1
_prepared = False


def _keep_large_freed_buffers():
    """Make glibc keep large freed buffers in the process; returns what was set (for tests), or None off glibc.

    By default glibc serves every allocation above 32 MiB with a fresh mmap and unmaps it on free, so each
    large tensor Paddle allocates on the CPU is page-faulted in again, every time. On a MAML meta-batch
    (tasks stacked on channels: a 480 MB first-layer activation) that made same-shape elementwise kernels
    several times slower than their arithmetic (doc/performance.md).
    Raising the mmap threshold serves them from the heap, and raising the trim threshold keeps a freed top
    of the heap instead of returning it to the kernel. Older glibc refuses mmap thresholds above 32 MiB
    (HEAP_MAX_SIZE / 2); there, turning mmap off for allocations (M_MMAP_MAX = 0) has the same effect.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):  # None, or ValueError, where the C library is not glibc
            return None
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (ValueError, OSError, AttributeError):
        return None
    settings = {}
    if mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1:
        settings["M_TRIM_THRESHOLD"] = _INT_MAX
    if mallopt(_M_MMAP_THRESHOLD, _INT_MAX) == 1:
        settings["M_MMAP_THRESHOLD"] = _INT_MAX
    elif mallopt(_M_MMAP_MAX, 0) == 1:
        settings["M_MMAP_MAX"] = 0
    return settings


def _is_amd_cpu(cpuinfo_path="/proc/cpuinfo"):
    try:
        with open(cpuinfo_path, encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return "AuthenticAMD" in line
    except OSError:
        pass
    return False


def prepare_cpu_process():
    """The process settings this model wants on a CPU; once per process, and only when Paddle's device is the
    CPU (a GPU run allocates its large tensors on the GPU). Call before the first large tensor."""
    global _prepared
    if _prepared or paddle.device.get_device() != "cpu":
        return
    _prepared = True
    _keep_large_freed_buffers()
    if _is_amd_cpu():
        # Paddle's bundled (older) MKL takes a slow generic code path on this vendor's CPUs; type 5 selects
        # its AVX2 path (doc/performance.md). MKL reads the variable at its first call, not when Paddle loads
        # it. Never set on other CPUs; a value the user set is kept.
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")

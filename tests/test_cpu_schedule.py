"""models/multitask/maml/maml_kernels/cpu_schedule.py and kernel_replay.py: the two-thread split applies to CPU tensors only,
the process settings take effect in-process when the plugin is imported, and the benchmark's replay runs the
calls a meta-iteration recorded, with their split plans."""
import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

from tests import maml_modules
from tests.conftest import REPO_ROOT

plugin, net, maml, ops = maml_modules.load()
# The engine's modules of the plugin itself: a fresh import could be another copy (see maml_modules.load).
cpu_schedule, kernel_replay, kernels = ops.cpu_schedule, ops.kernel_replay, ops.native_kernels


class _Place:
    def __init__(self, cpu):
        self.cpu = cpu

    def is_cpu_place(self):
        return self.cpu


class _Tensor:
    """Just what the scheduler looks at: the shape and the place (a GPU tensor cannot be made on a CPU build)."""

    def __init__(self, shape, cpu):
        self.shape, self.place = shape, _Place(cpu)


@pytest.mark.skipif(cpu_schedule.conv_threads() < 2, reason="MAML_CONV_THREADS=1: nothing is split anywhere")
def test_only_cpu_tensors_are_split_over_threads(monkeypatch):
    conv = kernels.ConvSettings(stride=1, padding=1, groups=4)
    weight = _Tensor([256, 64, 3, 3], cpu=True)
    large, small = [75, 256, 28, 28], [5, 256, 28, 28]
    assert cpu_schedule.split_plan(_Tensor(large, cpu=True), weight, conv, gradient=False) == "batch"
    assert cpu_schedule.split_plan(_Tensor(small, cpu=True), weight, conv, gradient=True) == "groups"
    for shape in (large, small):
        for gradient in (False, True):
            assert cpu_schedule.split_plan(_Tensor(shape, cpu=False), weight, conv, gradient) is None

    pooled = []
    monkeypatch.setattr(kernels, "max_pool2x2_with_index", lambda x: pooled.append(x) or ("out", "mask"))
    gpu_batch = _Tensor(large, cpu=False)
    assert cpu_schedule.max_pool2x2_with_index(gpu_batch) == ("out", "mask")
    assert pooled == [gpu_batch]  # one whole call, no halves on a worker thread


_ALLOCATOR_CHILD = r"""
import ctypes, json, sys
sys.path.insert(0, sys.argv[1])
from tests import maml_modules

maml_modules.load()  # imports the plugin, which prepares the process

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
size = 256 << 20  # far above glibc's default (dynamic) mmap threshold of at most 32 MiB
before = libc.mallinfo2()
block = libc.malloc(size)
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print("REPORT " + json.dumps({"mmapped": during.hblkhd - before.hblkhd, "kept_free": after.fordblks,
                              "size": size}))
"""


def _glibc_with_mallinfo2():
    try:
        import ctypes

        return bool(os.confstr("CS_GNU_LIBC_VERSION")) and hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except (ValueError, OSError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc_with_mallinfo2(),
                    reason="glibc >= 2.33 only (mallopt, mallinfo2)")
def test_importing_the_plugin_makes_glibc_keep_large_buffers():
    """A large allocation comes from the heap, not from a fresh mmap, and stays in the process once freed: what
    the tools' GLIBC_TUNABLES re-exec did, now done in-process by the model itself."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    process = subprocess.run([sys.executable, "-c", _ALLOCATOR_CHILD, REPO_ROOT], capture_output=True, text=True,
                             timeout=120, env=env, cwd=REPO_ROOT)
    assert process.returncode == 0, process.stderr[-3000:]
    report = json.loads([line for line in process.stdout.splitlines() if line.startswith("REPORT ")][-1][7:])
    assert report["mmapped"] == 0, report
    assert report["kept_free"] >= report["size"], report


def test_the_mkl_switch_is_for_amd_cpus_only(tmp_path):
    amd, intel = tmp_path / "amd", tmp_path / "intel"
    amd.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n")
    intel.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)\n")
    assert cpu_schedule._is_amd_cpu(str(amd)) is True
    assert cpu_schedule._is_amd_cpu(str(intel)) is False
    assert cpu_schedule._is_amd_cpu(str(tmp_path / "missing")) is False


_MKL_CHILD = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from tests import maml_modules

plugin = maml_modules.load()[0]
print("REPORT", os.environ.get("MKL_DEBUG_CPU_TYPE"), plugin.maml_kernels.cpu_schedule._is_amd_cpu())
"""


@pytest.mark.parametrize("users_value", [None, "4"])
def test_importing_the_plugin_sets_the_mkl_switch_on_amd_and_keeps_a_users_value(users_value):
    env = {k: v for k, v in os.environ.items() if k != "MKL_DEBUG_CPU_TYPE"}
    if users_value is not None:
        env["MKL_DEBUG_CPU_TYPE"] = users_value
    process = subprocess.run([sys.executable, "-c", _MKL_CHILD, REPO_ROOT], capture_output=True, text=True,
                             timeout=120, env=env, cwd=REPO_ROOT)
    assert process.returncode == 0, process.stderr[-3000:]
    _, value, amd = [line for line in process.stdout.splitlines() if line.startswith("REPORT ")][-1].split()
    expected = users_value or ("5" if amd == "True" else "None")
    assert value == expected


@pytest.mark.skipif(cpu_schedule.conv_threads() < 2, reason="MAML_CONV_THREADS=1: nothing is split anywhere")
def test_blocked_activations_are_cut_on_task_groups_only_where_the_copies_pay():
    """Task-group halves of blocked tensors are copied; they pay only against an uneven batch split of wide layers."""
    def plan(n, per_group, tasks=4, block=16):
        conv = kernels.ConvSettings(stride=1, padding=1, groups=tasks, block=block)
        x = _Tensor([n, tasks * per_group // block, 14, 14, block], cpu=True)
        return cpu_schedule.split_plan(x, _Tensor([tasks * per_group, per_group, 3, 3], cpu=True), conv, True)
    assert plan(5, 64) == "batch"     # 1/10 of imbalance against copies of 9/64
    assert plan(5, 128) == "groups"   # against 9/128
    assert plan(4, 128) == "batch"    # an even batch splits evenly
    assert plan(1, 64) == "groups"    # one image cannot be cut
    assert plan(5, 128, tasks=3) == "batch"  # an odd number of task groups
    assert plan(1, 24, tasks=2) is None  # halves of 48 channels are not whole blocks of 16, and 1 image stays whole


def _noting(replayed, kind, kernel):
    def run(*args):
        replayed.append((kind, args[-1]))  # the split plan is the last argument
        return kernel(*args)
    return run


@pytest.mark.parametrize("blocked", ["1", "0"])
def test_the_benchmark_replays_the_recorded_calls_with_their_plans(blocked, monkeypatch):
    monkeypatch.setenv("MAML_ONEDNN_BLOCKED", blocked)
    config = {"hyper_parameters.n_way": 3, "hyper_parameters.update_step": 1, "hyper_parameters.bn_channel": 8,
              "hyper_parameters.imgsize": 16, "hyper_parameters.first_order": True}
    rng = np.random.default_rng(0)
    tasks = 2
    batch = [rng.standard_normal((tasks, 3, 1, 16, 16)).astype("float32"), np.tile(np.arange(3), (tasks, 1)),
             rng.standard_normal((tasks, 9, 1, 16, 16)).astype("float32"), np.tile(np.arange(3).repeat(3), (tasks, 1))]
    model = plugin.DygraphModel().create_model(config)
    with kernel_replay.recording_convolutions() as calls:
        plugin.DygraphModel.meta_gradients(model, batch, config)
    recorded = len(calls)
    kinds = {kind for kind, _, _, _ in calls}
    blocked_run = any(len(shapes[0]) == 5 or conv.block for _, shapes, conv, _ in calls)
    # The first layer's weight gradient from a blocked output gradient is a kernel of its own.
    assert kinds == {"conv2d", "conv2d_grad"} | ({"conv2d_weight_grad_of_blocked"} if blocked_run else set())
    if cpu_schedule.conv_threads() >= 2:  # 9 query images split on the batch, 3 support images on the 2 tasks
        # (on the batch too where the activations are channel-blocked: oneDNN would copy task-group halves)
        plans = {plan for _, _, _, plan in calls}
        assert blocked_run == (blocked == "1" and ops.onednn_conv.supports(paddle.zeros([1, 1, 1, 1]),
                                                                          paddle.zeros([1])))
        assert plans >= ({"batch", None} if blocked_run else {"batch", "groups", None})
        assert "groups" not in plans or not blocked_run
    plugin.DygraphModel.meta_gradients(model, batch, config)
    assert len(calls) == recorded  # nothing is recorded outside the `with`

    replayed = []
    for kind, kernel in list(kernel_replay._KERNELS.items()):
        monkeypatch.setitem(kernel_replay._KERNELS, kind, _noting(replayed, kind, kernel))
    assert kernel_replay.replay_seconds(calls, "float32", repeats=1) > 0
    assert replayed == [(kind, plan) for kind, _, _, plan in calls] * 2  # the warm-up round, then 1 timed
    seconds, count = plugin.DygraphModel.kernel_seconds(model, batch, config)
    assert seconds > 0 and count == recorded

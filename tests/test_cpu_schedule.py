"""models/multitask/maml/cpu_schedule.py and kernel_replay.py: the two-thread split applies to CPU tensors only,
and the benchmark's replay runs the calls a meta-iteration recorded, with their split plans."""
import numpy as np
import pytest

from tests import maml_modules

plugin, net, maml, ops = maml_modules.load()
cpu_schedule, kernel_replay, kernels = ops.cpu_schedule, ops.kernel_replay, ops.kernels


class _Place:
    def __init__(self, cpu):
        self.cpu = cpu

    def is_cpu_place(self):
        return self.cpu


class _Tensor:
    """Just what the scheduler looks at: the shape and the place (a GPU tensor cannot be made on a CPU build)."""

    def __init__(self, shape, cpu):
        self.shape, self.place = shape, _Place(cpu)


@pytest.mark.skipif(cpu_schedule.CONV_THREADS < 2, reason="MAML_CONV_THREADS=1: nothing is split anywhere")
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


def _noting(replayed, kind, kernel):
    def run(*args):
        replayed.append((kind, args[-1]))  # the split plan is the last argument
        return kernel(*args)
    return run


def test_the_benchmark_replays_the_recorded_calls_with_their_plans(monkeypatch):
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
    assert {kind for kind, _, _, _ in calls} == {"conv2d", "conv2d_grad"}
    if cpu_schedule.CONV_THREADS >= 2:  # 9 query images split on the batch, 3 support images on the 2 tasks
        assert {"batch", "groups", None} <= {plan for _, _, _, plan in calls}
    plugin.DygraphModel.meta_gradients(model, batch, config)
    assert len(calls) == recorded  # nothing is recorded outside the `with`

    replayed = []
    for kind, kernel in list(kernel_replay._KERNELS.items()):
        monkeypatch.setitem(kernel_replay._KERNELS, kind, _noting(replayed, kind, kernel))
    assert kernel_replay.replay_seconds(calls, "float32", repeats=1) > 0
    assert replayed == [(kind, plan) for kind, _, _, plan in calls] * 2  # the warm-up round, then 1 timed
    seconds, count = plugin.DygraphModel.kernel_seconds(model, batch, config)
    assert seconds > 0 and count == recorded

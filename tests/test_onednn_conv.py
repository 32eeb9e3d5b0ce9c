"""The oneDNN convolutions (onednn_conv.py) against Paddle's own kernels, which the float64 finite-difference
tests verify: float32 results equal within rounding, for every setting the model uses, from two threads at
once, and through a whole second-order meta-gradient. Where oneDNN is not loaded these tests skip, saying so."""
import os
import subprocess
import sys
import threading
import warnings

import numpy as np
import paddle
import pytest
from paddle import _C_ops

from tests import maml_modules
from tests.conftest import REPO_ROOT

dygraph_model, net, maml, ops = maml_modules.load()
# The engine's modules of the plugin itself: a fresh import could be another copy (see maml_modules.load).
kernels, cpu_schedule, onednn_conv = ops.native_kernels, ops.cpu_schedule, ops.onednn_conv

needs_onednn = pytest.mark.skipif(onednn_conv._libs is None, reason="this Paddle has no loadable libdnnl.so.3")


def _paddle_kernels(x, w, dy, conv):
    attributes = kernels._conv_attributes(conv)
    return _C_ops.conv2d(x, w, *attributes), *_C_ops.conv2d_grad(x, w, dy, *attributes)


def _close(a, b, tol=2e-5):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    scale = max(float(np.abs(b).max()), 1e-30)
    assert float(np.abs(a - b).max()) / scale < tol, float(np.abs(a - b).max()) / scale


@needs_onednn
@pytest.mark.parametrize("n, in_per_group, groups, size, stride, padding", [
    (5, 1, 4, 28, 1, 1),    # the first layer: one input channel per task
    (7, 8, 4, 14, 1, 1),    # tasks on channels, an odd batch
    (3, 8, 1, 9, 2, 0),     # one group, stride 2, no padding
    (2, 3, 2, 5, 1, 1),     # a 3x3 plane smaller than... the last layer's
])
def test_forward_and_both_gradients_equal_paddles_kernels(n, in_per_group, groups, size, stride, padding):
    rng = np.random.default_rng(0)
    out_per_group = 6
    x = paddle.to_tensor(rng.standard_normal((n, groups * in_per_group, size, size)).astype("float32"))
    w = paddle.to_tensor(rng.standard_normal((groups * out_per_group, in_per_group, 3, 3)).astype("float32"))
    conv = kernels.ConvSettings(stride, padding, groups)
    y = onednn_conv.conv2d(x, w, conv)
    dy = paddle.to_tensor(rng.standard_normal(y.shape).astype("float32"))
    dx, dw = onednn_conv.conv2d_grad(x, w, dy, conv)
    for ours, theirs in zip((y, dx, dw), _paddle_kernels(x, w, dy, conv)):
        _close(ours, theirs)


@needs_onednn
def test_a_view_of_a_larger_tensor_is_read_where_it_lies():
    """The halves of a split convolution are slices: a batch slice shares memory, a channel slice is
    strided, and both must give the result of the same convolution on a copy."""
    rng = np.random.default_rng(1)
    whole = paddle.to_tensor(rng.standard_normal((6, 16, 8, 8)).astype("float32"))
    w = paddle.to_tensor(rng.standard_normal((12, 8, 3, 3)).astype("float32"))
    conv = kernels.ConvSettings(1, 1, 1)
    for view in (whole[3:, :8], whole[:, 8:], whole[2:5]):
        part = view[:, :8]
        _close(onednn_conv.conv2d(part, w, conv), _paddle_kernels(paddle.to_tensor(part.numpy()), w,
                                                                   paddle.zeros([part.shape[0], 12, 8, 8]),
                                                                   conv)[0])


@needs_onednn
def test_two_threads_running_the_same_primitive_at_once_get_their_own_results():
    rng = np.random.default_rng(2)
    conv = kernels.ConvSettings(1, 1, 2)
    w = paddle.to_tensor(rng.standard_normal((16, 4, 3, 3)).astype("float32"))
    inputs = [paddle.to_tensor(rng.standard_normal((9, 8, 14, 14)).astype("float32")) for _ in range(2)]
    expected = [_paddle_kernels(x, w, paddle.ones([9, 16, 14, 14]), conv) for x in inputs]
    results = [None, None]

    def work(i):
        for _ in range(20):
            y = onednn_conv.conv2d(inputs[i], w, conv)
            dx, dw = onednn_conv.conv2d_grad(inputs[i], w, paddle.ones([9, 16, 14, 14]), conv)
        results[i] = (y, dx, dw)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for got, want in zip(results, expected):
        assert got is not None
        for ours, theirs in zip(got, want):
            _close(ours, theirs)


@needs_onednn
@pytest.mark.parametrize("plan, n", [("batch", 9), ("groups", 5)])
def test_split_halves_written_into_one_output_equal_the_whole_call(plan, n):
    """cpu_schedule's two halves write straight into slices of one output, input gradient and (groups) weight
    gradient: a channel slice of the output is strided, so a wrong stride or offset shows up here."""
    rng = np.random.default_rng(3)
    conv = kernels.ConvSettings(1, 1, 4)
    x = paddle.to_tensor(rng.standard_normal((n, 4 * 8, 14, 14)).astype("float32"))
    w = paddle.to_tensor(rng.standard_normal((4 * 16, 8, 3, 3)).astype("float32"))
    dy = paddle.to_tensor(rng.standard_normal((n, 4 * 16, 14, 14)).astype("float32"))
    halves = cpu_schedule._halves(x, w, conv, plan, dy)[0]
    assert cpu_schedule._in_place(halves)  # else this would test the concat path
    y = cpu_schedule.conv2d(x, w, conv, plan)
    dx, dw = cpu_schedule.conv2d_grad(x, w, dy, conv, plan)
    for ours, theirs in zip((y, dx, dw), _paddle_kernels(x, w, dy, conv)):
        _close(ours, theirs)


@needs_onednn
def test_results_land_in_a_channel_slice_of_a_given_tensor_and_nowhere_else():
    rng = np.random.default_rng(4)
    conv = kernels.ConvSettings(1, 1, 1)
    x = paddle.to_tensor(rng.standard_normal((3, 8, 6, 6)).astype("float32"))
    w = paddle.to_tensor(rng.standard_normal((8, 8, 3, 3)).astype("float32"))
    dy = paddle.to_tensor(rng.standard_normal((3, 8, 6, 6)).astype("float32"))
    out, dx = paddle.full([3, 24, 6, 6], 7.0), paddle.full([3, 24, 6, 6], 7.0)
    onednn_conv.conv2d(x, w, conv, out=out[:, 8:16])
    onednn_conv.conv2d_grad(x, w, dy, conv, dx=dx[:, 8:16])
    y_want, dx_want, _ = _paddle_kernels(x, w, dy, conv)
    for got, want in ((out, y_want), (dx, dx_want)):
        _close(got[:, 8:16], want)
        assert (got[:, :8].numpy() == 7.0).all() and (got[:, 16:].numpy() == 7.0).all()
    with pytest.raises(ValueError, match="channel slice"):
        onednn_conv.conv2d(x, w, conv, out=paddle.zeros([3, 8, 6, 5]))


def test_float64_and_disabled_onednn_use_paddles_kernels(monkeypatch):
    x64 = paddle.zeros([1, 2, 5, 5], dtype="float64")
    assert not onednn_conv.supports(x64, paddle.zeros([2, 2, 3, 3], dtype="float64"))
    monkeypatch.setattr(onednn_conv, "_libs", None)
    assert not onednn_conv.supports(paddle.zeros([1, 2, 5, 5]), paddle.zeros([2, 2, 3, 3]))


def test_maml_onednn_0_keeps_onednn_unloaded():
    code = ("import sys; sys.path.insert(0, 'models/multitask/maml'); from maml_kernels import onednn_conv; "
            "print(onednn_conv._libs is None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=dict(os.environ, MAML_ONEDNN="0"),
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "True", out.stderr[-2000:]


def test_the_models_convolutions_go_to_onednn_and_the_first_layer_does_not():
    conv = kernels.ConvSettings(1, 1, 4)
    query = paddle.zeros([75, 256, 14, 14]), paddle.zeros([256, 64, 3, 3])
    support_half_last_layer = paddle.zeros([5, 128, 3, 3]), paddle.zeros([128, 64, 3, 3])
    first_layer = paddle.zeros([75, 4, 28, 28]), paddle.zeros([256, 1, 3, 3])
    assert onednn_conv.preferred(*query, conv) == (onednn_conv._libs is not None)
    assert onednn_conv.preferred(*support_half_last_layer, conv._replace(groups=2)) == (onednn_conv._libs is not None)
    assert not onednn_conv.preferred(*first_layer, conv)


@needs_onednn
def test_a_convolution_onednn_refuses_is_computed_by_paddles_kernel_with_one_warning(monkeypatch):
    def refuse(*args):
        raise onednn_conv.OneDNNError("oneDNN primitive descriptor failed (status 3)")

    monkeypatch.setattr(onednn_conv, "_create_convolution_primitives", refuse)
    monkeypatch.setattr(onednn_conv, "_primitives", {})
    rng = np.random.default_rng(4)
    x = paddle.to_tensor(rng.standard_normal((9, 16, 14, 14)).astype("float32"))
    w = paddle.to_tensor(rng.standard_normal((16, 8, 3, 3)).astype("float32"))
    conv = kernels.ConvSettings(1, 1, 2)
    with pytest.warns(UserWarning, match="oneDNN refused a convolution of .9, 16, 14, 14. by .16, 8, 3, 3."):
        assert not onednn_conv.preferred(x, w, conv)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second attempt, no second warning
        assert not onednn_conv.preferred(x, w, conv)
    _close(kernels.conv2d(x, w, conv), _paddle_kernels(x, w, paddle.zeros([9, 16, 14, 14]), conv)[0])


@needs_onednn
def test_second_order_meta_gradient_with_onednn_equals_paddles_kernels(monkeypatch):
    config = {"hyper_parameters.n_way": 3, "hyper_parameters.update_step": 2, "hyper_parameters.bn_channel": 8,
              "hyper_parameters.imgsize": 16, "hyper_parameters.base_optimizer.learning_rate": 0.3}
    rng = np.random.default_rng(3)
    batch = [rng.standard_normal((4, 3, 1, 16, 16)).astype("float32"), np.tile(np.arange(3), (4, 1)),
             rng.standard_normal((4, 6, 1, 16, 16)).astype("float32"), np.tile(np.arange(3).repeat(2), (4, 1))]
    # every convolution of this small network to oneDNN (the production threshold would keep the first layer
    # in Paddle's kernels), counting the calls so the comparison cannot pass by never reaching oneDNN
    monkeypatch.setattr(onednn_conv, "_MIN_CHANNELS_PER_GROUP", 1)
    calls = []
    for name in ("conv2d", "conv2d_grad"):
        original = getattr(onednn_conv, name)
        monkeypatch.setattr(onednn_conv, name, lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k))
    results = []
    for libs in (onednn_conv._libs, None):
        monkeypatch.setattr(onednn_conv, "_libs", libs)
        paddle.seed(0)
        model = dygraph_model.DygraphModel().create_model(config)
        loss, grads = dygraph_model.DygraphModel.meta_gradients(model, batch, config)
        results.append((float(loss), [g.numpy() for g in grads]))
    assert len(calls) > 20  # the first pass's forward, backward and double-backward convolutions
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(loss_a - loss_b) < 1e-5 * max(1.0, abs(loss_b))
    for a, b in zip(grads_a, grads_b):
        _close(a, b, tol=1e-3)

"""Channel-blocked activations (onednn_conv's blocked tensors, onednn_layers.py) against the plain NCHW path of
Paddle's kernels, which the float64 finite-difference tests verify: every layer's forward, backward and second
derivative, and whole meta-gradients of both orders, equal within float32 rounding, for both block sizes
(16: AVX-512 code, 8: AVX2), whichever oneDNN picks on this CPU. Where oneDNN is not loaded these tests skip."""
import numpy as np
import paddle
import pytest

from tests import maml_modules

dygraph_model, net, maml, ops = maml_modules.load()
# The engine's modules of the plugin itself: a fresh import could be another copy (see maml_modules.load).
kernels, cpu_schedule = ops.native_kernels, ops.cpu_schedule
onednn_conv, onednn_layers = ops.onednn_conv, ops.onednn_layers

needs_onednn = pytest.mark.skipif(onednn_conv._libs is None, reason="this Paddle has no loadable libdnnl.so.3")
BLOCKS = [16, 8]


def _close(a, b, tol=2e-5):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(float(np.abs(b).max()), 1e-30)
    assert float(np.abs(a - b).max()) / scale < tol, float(np.abs(a - b).max()) / scale


def _random(rng, *shape):
    return paddle.to_tensor(rng.standard_normal(shape).astype("float32"))


def _blocked(x, block):
    """The blocked layout by Paddle's own reshape and transpose, to check oneDNN's reorder against."""
    n, c, h, w = x.shape
    return x.reshape([n, c // block, block, h, w]).transpose([0, 1, 3, 4, 2]).contiguous()


def _fill_free_memory_with_garbage():
    """Fresh tensors then reuse memory that held large values: an element a kernel fails to write shows."""
    junk = [paddle.full([1 << 20], 3.0e7) for _ in range(8)]
    del junk


@needs_onednn
@pytest.mark.parametrize("block", BLOCKS)
def test_the_layout_change_is_the_documented_permutation_both_ways(block):
    x = _random(np.random.default_rng(0), 3, 4 * block, 5, 7)
    blocked = onednn_layers.blocked(x, block)
    assert blocked.shape == [3, 4, 5, 7, block]
    assert (blocked.numpy() == _blocked(x, block).numpy()).all()
    assert (onednn_layers.plain(blocked).numpy() == x.numpy()).all()
    assert onednn_conv.logical_shape(blocked) == [3, 4 * block, 5, 7]


@needs_onednn
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("n, size, channels", [(15, 7, 32), (5, 14, 32), (4, 3, 16), (9, 28, 16),
                                               (24, 28, 64)])  # from 2**18 elements: two OpenMP threads
def test_batch_norm_and_max_pool_equal_paddles_kernels(block, n, size, channels):
    rng = np.random.default_rng(n + size)
    threads = onednn_layers._threads([n, channels, size, size])
    two = n * channels * size * size >= 2 ** 18 and cpu_schedule.conv_threads() > 1
    assert threads == (2 if two else 1)
    x, dy = _random(rng, n, channels, size, size), _random(rng, n, channels, size, size)
    gamma = paddle.to_tensor(rng.uniform(0.5, 1.5, channels).astype("float32"))
    beta = _random(rng, channels)
    xb, dyb = _blocked(x, block), _blocked(dy, block)

    out, mean, inv_std = kernels.batch_norm_training(x, gamma, beta, paddle.zeros([channels]),
                                                     paddle.ones([channels]), epsilon=1e-5)
    _fill_free_memory_with_garbage()
    out_b, mean_b, variance_b = onednn_layers.batch_norm_training(xb, gamma, beta, epsilon=1e-5)
    assert onednn_layers._batch_norm((n, channels, size, size), block, 1e-5, 6)[0].threads == threads
    _close(onednn_layers.plain(out_b), out)
    _close(mean_b, mean)
    _close(paddle.rsqrt(variance_b + 1e-5), inv_std)
    dx, dgamma, dbeta = kernels.batch_norm_grad(x, gamma, beta, mean, inv_std, dy, epsilon=1e-5)
    dx_b, dgamma_b, dbeta_b = onednn_layers.batch_norm_grad(xb, gamma, mean_b, variance_b, dyb, epsilon=1e-5)
    for ours, theirs in ((onednn_layers.plain(dx_b), dx), (dgamma_b, dgamma), (dbeta_b, dbeta)):
        _close(ours, theirs)
    given = onednn_layers.batch_norm_given_statistics(xb, beta, gamma, mean_b, variance_b, epsilon=1e-5)
    _close(onednn_layers.plain(given), kernels.batch_norm_given_statistics(
        x, beta, gamma, mean, 1.0 / (inv_std * inv_std) - 1e-5, epsilon=1e-5))

    pooled, index = kernels.max_pool2x2_with_index(x)
    _fill_free_memory_with_garbage()
    pooled_b, workspace = onednn_layers.max_pool2x2(xb)
    assert (onednn_layers.plain(pooled_b).numpy() == pooled.numpy()).all()  # random data: no ties
    dout = _random(rng, *pooled.shape)
    _fill_free_memory_with_garbage()  # an odd last row and column are in no window: their gradient is 0
    routed = onednn_layers.max_pool2x2_grad(xb.shape, workspace, _blocked(dout, block))
    assert (onednn_layers.plain(routed).numpy() == kernels.max_pool2x2_with_index_grad(x, index, dout).numpy()).all()
    gathered = onednn_layers.max_pool2x2_gather(dyb, workspace)
    expected = paddle.index_sample(dy.reshape([n * channels, -1]), index.reshape([n * channels, -1]))
    assert (onednn_layers.plain(gathered).numpy() == expected.reshape(pooled.shape).numpy()).all()


@needs_onednn
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("n, groups, in_per_group, stride, size", [(5, 4, 1, 1, 13), (9, 2, 3, 2, 10)])
def test_the_weight_gradient_from_a_blocked_output_gradient_equals_paddles(block, n, groups, in_per_group, stride,
                                                                           size):
    """The first layer's weight gradient (native_kernels.conv2d_weight_grad_of_blocked: unfolded images times
    the blocked output gradient) against Paddle's conv2d_grad on the plain one; odd sizes and a stride of 2."""
    rng = np.random.default_rng(n)
    x = _random(rng, n, groups * in_per_group, size, size)
    weight = _random(rng, groups * 2 * block, in_per_group, 3, 3)
    conv = kernels.ConvSettings(stride, 1, groups)
    dy = _random(rng, *kernels.conv2d(x, weight, conv).shape)
    expected = kernels.conv2d_grad(x, weight, dy, conv)[1]
    _fill_free_memory_with_garbage()
    got = kernels.conv2d_weight_grad_of_blocked(x, onednn_layers.blocked(dy, block), conv, weight.shape)
    _close(got.numpy(), expected.numpy())


@needs_onednn
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("shape", [(3, 32, 5, 7), (5, 256, 28, 28)])  # odd sizes; a two-thread primitive
def test_add_scaled_accumulates_a_per_channel_multiple(block, shape):
    rng = np.random.default_rng(1)
    t, out = _random(rng, *shape), _random(rng, *shape)
    scale = _random(rng, shape[1])
    expected = out.numpy() + t.numpy() * scale.numpy().reshape(1, -1, 1, 1)
    _fill_free_memory_with_garbage()
    accumulated = onednn_layers.blocked(out, block)
    returned = onednn_layers.add_scaled_(accumulated, onednn_layers.blocked(t, block), scale)
    assert returned is accumulated
    _close(onednn_layers.plain(accumulated).numpy(), expected)


@needs_onednn
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("shape", [(3, 32, 5, 7), (5, 256, 28, 28)])  # odd sizes; a two-thread primitive
def test_max_pool_with_relu_in_one_pass_and_the_relu_gradient(block, shape):
    rng = np.random.default_rng(2)
    x = onednn_layers.blocked(_random(rng, *shape), block)
    pooled, workspace = onednn_layers.max_pool2x2(x)
    _fill_free_memory_with_garbage()
    fused, fused_workspace = onednn_layers.max_pool2x2(x, relu=True)
    assert (fused.numpy() == np.maximum(pooled.numpy(), 0)).all()
    assert (fused_workspace.numpy() == workspace.numpy()).all()  # the backward reads either
    dout = _random(rng, *fused.shape)
    _fill_free_memory_with_garbage()
    assert (onednn_layers.relu_grad(dout, fused).numpy() == dout.numpy() * (fused.numpy() > 0)).all()


def _layer_derivatives(block, n, rng):
    """Logits and both orders' meta-gradients of a task_logits network (4 tasks, 2 blocks, 16 channels),
    with the activations blocked by `block` or plain (0)."""
    tasks, channels = 4, 16
    paddle.seed(0)
    model = net.MAMLNet(3, channels=channels, blocks=2, imgsize=12)
    params = {name: p.detach() for name, p in net.expand_to_tasks(dict(model.named_parameters()), tasks).items()}
    x = _random(rng, tasks, n, 1, 12, 12)
    y = paddle.to_tensor(rng.integers(0, 3, (tasks, n)))
    results = []
    original = ops.activation_block
    ops.activation_block = lambda *args: block
    try:
        for second_order in (False, True):
            for p in params.values():
                p.stop_gradient = False
            losses, logits = net.task_losses(params, x, y, blocks=2)
            grads = paddle.grad(losses.sum(), list(params.values()), create_graph=second_order)
            fast = {name: p - 0.4 * g for (name, p), g in zip(params.items(), grads)}
            meta = paddle.grad(net.task_losses(fast, x, y, blocks=2)[0].sum(), list(params.values()))
            results.append([logits.numpy()] + [g.numpy() for g in grads] + [g.numpy() for g in meta])
    finally:
        ops.activation_block = original
    return results


@needs_onednn
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("n", [5, 9])
@pytest.mark.parametrize("halves", ["batch", "groups"])  # how the split convolutions are cut, wherever they are
def test_meta_gradients_of_both_orders_through_blocked_layers_equal_the_plain_path(block, n, halves, monkeypatch):
    # cpu_schedule cuts blocked tensors on the batch only; task-group halves of them (channel slices, copied for
    # oneDNN) must still be exact, and are forced here, as the plain path is.
    chosen = []
    default_plan = cpu_schedule.split_plan
    monkeypatch.setattr(cpu_schedule, "split_plan",
                        lambda *a, **k: chosen.append(default_plan(*a, **k) and halves) or chosen[-1])
    blocked = _layer_derivatives(block, n, np.random.default_rng(n))
    plain = _layer_derivatives(0, n, np.random.default_rng(n))
    if ops.conv_threads() >= 2:
        assert halves in chosen
    first_order, second_order = plain
    assert any(np.abs(a - b).max() > 1e-4 * np.abs(b).max() for a, b in zip(first_order, second_order)), \
        "the second-order meta-gradient must differ from the first-order one, or the check proves nothing"
    for ours, theirs in zip(blocked, plain):
        for a, b in zip(ours, theirs):
            _close(a, b, tol=1e-4)


@needs_onednn
def test_the_model_keeps_its_float32_cpu_activations_blocked_and_float64_plain():
    paddle.seed(0)
    model = net.MAMLNet(5, channels=64)
    weights = [getattr(model, net.block_names(b).conv) for b in range(4)]
    tasks = [paddle.tile(w, [4, 1, 1, 1]) for w in weights]
    images = paddle.zeros([5, 4, 28, 28])
    assert ops.activation_block(images, tasks, 1, 1, 4) in (8, 16)
    assert ops.activation_block(images.astype("float64"), [w.astype("float64") for w in tasks], 1, 1, 4) == 0
    odd = [paddle.zeros([4 * 12, w.shape[1] and 12 if i else 1, 3, 3]) for i, w in enumerate(weights)]
    assert ops.activation_block(images, odd, 1, 1, 4) in (0, 16)  # 48 channels: whole blocks of 16, not of 32


def test_maml_onednn_blocked_0_keeps_activations_plain(monkeypatch):
    monkeypatch.setenv("MAML_ONEDNN_BLOCKED", "0")
    weights = [paddle.zeros([256, 1, 3, 3])] + [paddle.zeros([256, 64, 3, 3])] * 3
    assert ops.activation_block(paddle.zeros([5, 4, 28, 28]), weights, 1, 1, 4) == 0


@needs_onednn
def test_windows_of_nan_and_minus_inf_are_routed_inside_their_window():
    """Paddle's pooling index is -1 for such a window (double_grad_ops clips it); oneDNN's workspace holds an
    index within the window, so the routing stays inside the tensor and the gradients are finite."""
    x = paddle.full([2, 16, 4, 4], float("nan"))
    x[:, :, 2:, 2:] = float("-inf")
    pooled, workspace = onednn_layers.max_pool2x2(onednn_layers.blocked(x, 16))
    ones = paddle.ones(pooled.shape)
    routed = onednn_layers.plain(onednn_layers.max_pool2x2_grad([2, 1, 4, 4, 16], workspace, ones))
    assert routed.numpy().reshape(2, 16, 2, 2, 2, 2).sum(axis=(3, 5)).tolist() == np.ones([2, 16, 2, 2]).tolist()
    gathered = onednn_layers.max_pool2x2_gather(onednn_layers.blocked(paddle.ones([2, 16, 4, 4]), 16), workspace)
    assert (gathered.numpy() == 1.0).all()

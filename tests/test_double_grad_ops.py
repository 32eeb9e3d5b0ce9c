"""Each double-differentiable op: forward equal to Paddle's native op, first and second derivatives equal to
float64 central finite differences. Small steps (1e-6) and smooth test functions keep the differences away
from ReLU and max-pool kinks (see ../shared/notes/paddle-second-order.md)."""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from tests import maml_modules
from tests.maml_modules import central_difference, directional, float64, relative_error

_, _, _, ops = maml_modules.load()
rng = np.random.default_rng(2026)


def _weights(shape):
    """Fixed random weights that make the scalar test functions depend on every output element."""
    return paddle.to_tensor(np.linspace(0.2, 1.0, int(np.prod(shape))).reshape(shape))


def _cases():
    x_img = rng.standard_normal((3, 4, 6, 6))
    data = paddle.to_tensor(x_img)  # an input that takes no gradient, like the images at layer 1
    labels = paddle.to_tensor(rng.integers(0, 5, (4, 6)))
    return {
        # grouped conv, gradient in both input and weight
        "conv2d(x, w)": (lambda x, w: ops.conv2d(x, w, 1, 1, 2), [x_img, rng.standard_normal((6, 2, 3, 3))]),
        # the silent case of native conv2d: input needs no gradient, only the weight does
        "conv2d(data, w)": (lambda w: ops.conv2d(data, w, 1, 1, 2), [rng.standard_normal((6, 2, 3, 3))]),
        "conv2d stride 2": (lambda x, w: ops.conv2d(x, w, 2, 1, 1), [x_img, rng.standard_normal((5, 4, 3, 3))]),
        "batch_norm(x, g, b)": (lambda x, g, b: ops.batch_norm(x, g, b),
                                [rng.standard_normal((4, 5, 5, 5)), rng.standard_normal(5), rng.standard_normal(5)]),
        "batch_norm(data, g, b)": (lambda g, b: ops.batch_norm(data, g, b), [rng.standard_normal(4), rng.standard_normal(4)]),
        "max_pool2d (odd size)": (lambda x: ops.max_pool2d(x), [rng.standard_normal((2, 3, 7, 7))]),
        "cross_entropy": (lambda z: ops.cross_entropy(z, labels), [rng.standard_normal((4, 6, 5))]),
    }


CASES = _cases()


def _native(name, inputs):
    """The same computation with Paddle's own ops (forward only)."""
    t = [paddle.to_tensor(v) for v in inputs]
    if name == "conv2d(x, w)":
        return F.conv2d(t[0], t[1], padding=1, groups=2)
    if name == "conv2d stride 2":
        return F.conv2d(t[0], t[1], stride=2, padding=1)
    if name == "batch_norm(x, g, b)":
        c = inputs[1].shape[0]
        return F.batch_norm(t[0], paddle.zeros([c]), paddle.ones([c]), t[1], t[2], training=True)
    if name == "max_pool2d (odd size)":
        return F.max_pool2d(t[0], 2)
    return None


@pytest.mark.parametrize("name", ["conv2d(x, w)", "conv2d stride 2", "batch_norm(x, g, b)", "max_pool2d (odd size)"])
def test_forward_equals_native_op(name):
    with float64():
        f, inputs = CASES[name]
        ours = f(*[paddle.to_tensor(v) for v in inputs]).numpy()
        np.testing.assert_allclose(ours, _native(name, inputs).numpy(), rtol=1e-12, atol=1e-12)


def test_cross_entropy_forward_equals_native():
    with float64():
        z = paddle.to_tensor(rng.standard_normal((4, 6, 5)))
        y = paddle.to_tensor(rng.integers(0, 5, (4, 6)))
        native = F.cross_entropy(z, y.unsqueeze(-1), reduction="none").squeeze(-1)
        np.testing.assert_allclose(ops.cross_entropy(z, y).numpy(), native.numpy(), rtol=1e-12, atol=1e-12)


def _scalar(f, ts, out_weights):
    """A smooth scalar of the op's output whose gradient touches every output element."""
    return (f(*ts) ** 3 * out_weights).sum()


@pytest.mark.parametrize("name", list(CASES))
def test_first_derivative_matches_finite_differences(name):
    with float64():
        f, inputs = CASES[name]
        out_weights = _weights(f(*[paddle.to_tensor(v) for v in inputs]).shape)

        def value(point):
            return float(_scalar(f, [paddle.to_tensor(p) for p in point], out_weights))

        ts = [paddle.to_tensor(v, stop_gradient=False) for v in inputs]
        grads = paddle.grad(_scalar(f, ts, out_weights), ts)
        for _ in range(2):
            direction = [rng.standard_normal(v.shape) for v in inputs]
            fd = central_difference(value, inputs, direction)
            assert relative_error(directional([g.numpy() for g in grads], direction), fd) < 1e-6


@pytest.mark.parametrize("name", list(CASES))
def test_second_derivative_matches_finite_differences(name):
    """d/dv of h(v) = sum(c * grad f(v)^2): needs the op's second derivative in every input."""
    with float64():
        f, inputs = CASES[name]
        out_weights = _weights(f(*[paddle.to_tensor(v) for v in inputs]).shape)
        coefs = [paddle.to_tensor(rng.random(v.shape)) for v in inputs]

        def h(ts, create_graph):
            grads = paddle.grad(_scalar(f, ts, out_weights), ts, create_graph=create_graph)
            return sum((g * g * c).sum() for g, c in zip(grads, coefs))

        def value(point):
            return float(h([paddle.to_tensor(p, stop_gradient=False) for p in point], False))

        ts = [paddle.to_tensor(v, stop_gradient=False) for v in inputs]
        second = paddle.grad(h(ts, True), ts)
        for _ in range(2):
            direction = [rng.standard_normal(v.shape) for v in inputs]
            fd = central_difference(value, inputs, direction)
            assert relative_error(directional([g.numpy() for g in second], direction), fd) < 1e-6

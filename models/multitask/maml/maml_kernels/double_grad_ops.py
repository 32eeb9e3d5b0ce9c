"""Network layers whose second derivatives are exact in Paddle dygraph, at native-kernel speed.

Why this module exists (measured on paddle 3.3.1, see doc/second_order.md):
- `F.conv2d`'s double backward silently drops the weight path when the layer input needs no gradient,
  so a MAML built on it is first-order without any error;
- `F.max_pool2d`, softmax and cross-entropy have no double backward at all;
- `F.batch_norm`'s double backward is correct but quadratic in the batch on CPU.

The recipe is the same for every layer: a `PyLayer` whose forward and backward call Paddle's fused native
kernels, where the backward is itself a `PyLayer` whose own backward (the second derivative) is written,
again, with native kernels. Each op here is exact to second order (what MAML needs); a third derivative is
not supported. One exception, batch_norm_by_support, is exact to first order and refuses a second: its one user,
the query forward of norm_mode "support", is differentiated once. Layout is NCHW throughout.

Beside this module: native_kernels.py wraps the native calls (one named function per kernel);
cpu_schedule.py runs a convolution or a large max-pool on a CPU as two halves on two threads;
kernel_replay.py records the convolution calls for tools/benchmark.py.
"""
import os

import paddle
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from . import cpu_schedule
from . import kernel_replay
from . import native_kernels as kernels
from . import onednn_conv
from . import onednn_layers

__all__ = ["conv2d", "batch_norm", "batch_norm_by_support", "max_pool2d", "max_pool2d_relu", "cross_entropy",
           "activation_block", "to_plain"]


def _needed(inputs, grads):
    """Paddle requires a PyLayer's backward to return None for inputs that take no gradient."""
    return tuple(None if t.stop_gradient else g for t, g in zip(inputs, grads))


# --------------------------------------------------------------------------------------------- conv2d
# Every native convolution of the ops goes through these two functions. The split plan (cpu_schedule) is
# chosen here and handed down so that a benchmark's recording holds the very plan its replay runs.
def _conv(x, w, conv):
    plan = cpu_schedule.split_plan(x, w, conv, gradient=False)
    kernel_replay.record("conv2d", (x, w), conv, plan)
    return cpu_schedule.conv2d(x, w, conv, plan)


def _conv_grad(x, w, dy, conv):
    """Native (d/dx, d/dw) of sum(dy * conv(x, w)); one kernel call (per half) gives both."""
    plan = cpu_schedule.split_plan(x, w, conv, gradient=True)
    kernel_replay.record("conv2d_grad", (x, w, dy), conv, plan)
    return cpu_schedule.conv2d_grad(x, w, dy, conv, plan)


class _Conv2D(PyLayer):
    @staticmethod
    def forward(ctx, x, w, stride, padding, groups, block):
        ctx.conv = kernels.ConvSettings(stride, padding, groups, block)
        ctx.save_for_backward(x, w)
        return _conv(x, w, ctx.conv)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensor()
        dx, dw = _Conv2DGrad.apply(x, w, dy, *ctx.conv)
        return _needed((x, w), (dx, dw))


class _Conv2DGrad(PyLayer):
    """(dx, dw) = conv-backward(x, w, dy) as a differentiable function of x, w and dy."""

    @staticmethod
    def forward(ctx, x, w, dy, stride, padding, groups, block):
        ctx.conv = kernels.ConvSettings(stride, padding, groups, block)
        ctx.save_for_backward(x, w, dy)
        return _conv_grad(x, w, dy, ctx.conv)

    @staticmethod
    def backward(ctx, ddx, ddw):
        # dx is linear in (dy, w) and dw is linear in (x, dy), so with upstream gradients (ddx, ddw):
        #   d/d(dy) = conv(ddx, w) + conv(x, ddw)
        #   d/dx    = conv-input-grad(dy, ddw)   and   d/dw = conv-weight-grad(ddx, dy),
        # and the last two are exactly what one native conv2d_grad call computes for (ddx, ddw, dy).
        x, w, dy = ctx.saved_tensor()
        if x.stop_gradient:
            # dx of a layer whose input takes no gradient (the images) is never used, so its upstream
            # gradient is exactly zero; Paddle hands it over as a materialised zero tensor, not None.
            ddx = None
        d_dy = _conv(x, ddw, ctx.conv) if ddw is not None else None
        if ddx is not None:
            d_dy = _conv(ddx, w, ctx.conv) if d_dy is None else d_dy + _conv(ddx, w, ctx.conv)
        d_x = d_w = None
        if ddw is not None and ddx is not None:
            d_x, d_w = _conv_grad(ddx, ddw, dy, ctx.conv)
        elif ddw is not None and not x.stop_gradient:  # the first layer's input (data) takes none
            d_x = _conv_grad(x, ddw, dy, ctx.conv)[0]
        elif ddx is not None:
            d_w = _conv_grad(ddx, w, dy, ctx.conv)[1]
        return _needed((x, w, dy), (d_x, d_w, d_dy))


def conv2d(x, weight, stride=1, padding=1, groups=1, block=0):
    """`F.conv2d` (no bias) with an exact second derivative in x and weight. x is plain NCHW or channel-blocked
    (onednn_conv's blocked tensors); the result is blocked by `block` (0: plain; see activation_block)."""
    if block and len(x.shape) == 4:
        # A plain input (the images): oneDNN has only its slow reference code for a blocked output there
        # (one input channel per group), so the convolution stays plain and one copy changes the layout.
        if x.stop_gradient and (weight.shape[0] // groups) % block == 0:
            return _ImageConv2D.apply(x, weight, stride, padding, groups, block)
        return _ToBlocked.apply(_Conv2D.apply(x, weight, stride, padding, groups, 0), block)
    return _Conv2D.apply(x, weight, stride, padding, groups, block)


def _image_conv(x, w, conv):
    """conv(x, w) for a plain x, blocked by conv.block: Paddle's kernel, then the layout copy."""
    return onednn_layers.blocked(_conv(x, w, conv._replace(block=0)), conv.block)


def _image_weight_grad(x, w, dy, conv):
    plan = cpu_schedule.split_plan(x, w, conv, gradient=True)
    kernel_replay.record("conv2d_weight_grad_of_blocked", (x, w, dy), conv, plan)
    return cpu_schedule.conv2d_weight_grad_of_blocked(x, w, dy, conv, plan)


class _ImageConv2D(PyLayer):
    """The first layer: conv(x, w) of an input that takes no gradient (the images), blocked by `block`. Its only
    derivative is the weight's, taken from the blocked output gradient as it is (native_kernels'
    conv2d_weight_grad_of_blocked): no layout copy back to NCHW, no input gradient (doc/performance.md)."""

    @staticmethod
    def forward(ctx, x, w, stride, padding, groups, block):
        ctx.conv = kernels.ConvSettings(stride, padding, groups, block)
        ctx.save_for_backward(x, w)
        return _image_conv(x, w, ctx.conv)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensor()
        return _needed((x, w), (None, _ImageConvWeightGrad.apply(x, w.detach(), dy, *ctx.conv)))


class _ImageConvWeightGrad(PyLayer):
    """d/dw of sum(dy * conv(x, w)) as a differentiable function of dy (x and w take no gradient here): linear
    in dy, so for an upstream gradient ddw its derivative is conv(x, ddw), blocked as dy is."""

    @staticmethod
    def forward(ctx, x, w, dy, stride, padding, groups, block):
        ctx.conv = kernels.ConvSettings(stride, padding, groups, block)
        ctx.save_for_backward(x)
        return _image_weight_grad(x, w, dy.detach(), ctx.conv)

    @staticmethod
    def backward(ctx, ddw):
        (x,) = ctx.saved_tensor()
        return None, None, _image_conv(x, ddw.detach(), ctx.conv)


class _ToBlocked(PyLayer):
    """The layout change, a permutation of the elements: its derivative is the inverse permutation, and so on
    to any order."""

    @staticmethod
    def forward(ctx, x, block):
        return onednn_layers.blocked(x.detach(), block)

    @staticmethod
    def backward(ctx, dy):
        return _ToPlain.apply(dy)


class _ToPlain(PyLayer):
    @staticmethod
    def forward(ctx, x):
        ctx.block = x.shape[4]
        return onednn_layers.plain(x.detach())

    @staticmethod
    def backward(ctx, dy):
        return _ToBlocked.apply(dy, ctx.block)


def activation_block(x, conv_weights, stride=1, padding=1, groups=1):
    """The channel block (16, 8) in which the network's activations are best kept between its layers, for
    images x (plain NCHW) and the blocks' conv weights; 0 keeps them plain NCHW. Blocked only where every
    layer then runs in oneDNN: float32 CPU tensors, oneDNN's convolution wanting that layout, every layer's
    channels whole blocks. MAML_ONEDNN_BLOCKED=0 turns it off."""
    if os.environ.get("MAML_ONEDNN_BLOCKED", "1") == "0" or not onednn_conv.supports(x, conv_weights[0]):
        return 0
    conv = kernels.ConvSettings(stride, padding, groups)
    shape = onednn_conv.output_shape(x.shape, conv_weights[0].shape, conv)
    probe = conv_weights[1] if len(conv_weights) > 1 else conv_weights[0]
    x_shape = onednn_layers.pooled_shape(shape) if len(conv_weights) > 1 else list(x.shape)
    if probe.shape[1] * groups != x_shape[1]:
        return 0
    block = onednn_conv.activation_block(x_shape, probe.shape, conv)
    if not block or any(weight.shape[0] % block for weight in conv_weights):
        return 0
    return block


def to_plain(h):
    """A blocked activation as plain NCHW (a plain one as it is); differentiable to any order."""
    return _ToPlain.apply(h) if len(h.shape) == 5 else h


# ----------------------------------------------------------------------------------------- batch norm
class _BNStats:
    """Per-channel batch statistics of one batch-norm call, carried outside the autograd inputs: their
    dependence on x is accounted for analytically in the formulas below. `variance` may be None (then
    computed from inv_std when needed)."""

    def __init__(self, mean, inv_std, beta, eps, count, variance=None):
        self.mean, self.inv_std, self.beta, self.eps, self.count = mean, inv_std, beta, eps, count
        self.variance = variance


_constants = {}


def _constant(kind, channels, dtype):
    """A cached per-channel vector: "zeros"/"ones" are read-only constants; "running_mean"/"running_var" are
    scratch buffers the native batch_norm updates in place (training mode never reads them). Creating them
    per call was two extra ops for every batch-norm kernel (~500 per second-order meta-iteration)."""
    key = (kind, channels, dtype)
    value = _constants.get(key)
    if value is None:
        fill = paddle.zeros if kind in ("zeros", "running_mean") else paddle.ones
        value = _constants[key] = fill([channels], dtype=dtype)
    return value


def _bn_forward(x, scale, bias, eps):
    """(scale * x_hat + bias, mean, 1/std, variance or None) with x_hat normalised by the batch statistics of x.
    Blocked tensors go to oneDNN's kernels (onednn_layers), plain ones to Paddle's."""
    if len(x.shape) == 5:
        out, mean, variance = onednn_layers.batch_norm_training(x, scale, bias, epsilon=eps)
        return out, mean, paddle.rsqrt(variance + eps), variance
    channels = x.shape[1]
    running_mean = _constant("running_mean", channels, x.dtype)
    running_var = _constant("running_var", channels, x.dtype)
    return kernels.batch_norm_training(x, scale, bias, running_mean, running_var, epsilon=eps) + (None,)


def _bn_affine(x, scale, bias, stats):
    """scale * x_hat + bias with the statistics already known: batch_norm in global-statistics mode skips
    the statistics pass, which would cost as much again (doc/performance.md)."""
    variance = _variance(stats)
    if len(x.shape) == 5:
        return onednn_layers.batch_norm_given_statistics(x, scale, bias, stats.mean, variance, epsilon=stats.eps)
    return kernels.batch_norm_given_statistics(x, scale, bias, stats.mean, variance, epsilon=stats.eps)


def _variance(stats):
    if stats.variance is None:
        stats.variance = 1.0 / (stats.inv_std * stats.inv_std) - stats.eps  # so that 1/sqrt(var + eps) = r
    return stats.variance


def _bn_backward(x, scale, dy, stats):
    """Native batch-norm backward: (scale*r*(dy - <dy> - x_hat<dy x_hat>), sum(dy x_hat), sum(dy))."""
    if len(x.shape) == 5:
        return onednn_layers.batch_norm_grad(x, scale, stats.mean, _variance(stats), dy, epsilon=stats.eps)
    return kernels.batch_norm_grad(x, scale, stats.beta, stats.mean, stats.inv_std, dy, epsilon=stats.eps)


class _BatchNorm(PyLayer):
    @staticmethod
    def forward(ctx, x, gamma, beta, eps):
        out, mean, inv_std, variance = _bn_forward(x, gamma, beta, eps)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        ctx.stats = _BNStats(mean, inv_std, beta.detach(), eps, count, variance)
        ctx.save_for_backward(x, gamma, beta)
        return out

    @staticmethod
    def backward(ctx, dy):
        x, gamma, beta = ctx.saved_tensor()
        return _needed((x, gamma, beta), _BatchNormGrad.apply(x, gamma, dy, ctx.stats))


def _channel_dot(a, b, stats):
    """Per-channel sum(a * b) over N, H, W. A reduction op (`(a * b).sum(axis=[0, 2, 3])`) is several times
    slower on CPU than batch_norm_grad, whose scale gradient is sum(dy * (x - mean) * inv_std): with x = b, mean 0
    and inv_std 1 that is exactly sum(a * b)."""
    channels = onednn_conv.logical_shape(b)[1]
    zeros = _constant("zeros", channels, b.dtype)
    ones = _constant("ones", channels, b.dtype)
    if len(b.shape) == 5:  # variance 1 with epsilon 0: r = 1 exactly
        return onednn_layers.batch_norm_grad(b, ones, zeros, ones, a, epsilon=0.0)[1]
    return kernels.batch_norm_grad(b, ones, zeros, zeros, ones, a, epsilon=stats.eps)[1]


class _BatchNormGrad(PyLayer):
    """(dx, dgamma, dbeta) of batch norm as a differentiable function of (x, gamma, dy).

    Per channel, with m elements, r = 1/std, x_hat = (x - mean) r, <.> the channel mean, g = dy:
        dx = gamma r (g - <g> - x_hat q),  dgamma = m q,  dbeta = m <g>,  where q = <g x_hat>.
    For upstream gradients A (of dx), B (of dgamma), C (of dbeta), with Am = <A>, a = <A x_hat>:
        d/dg     = gamma r (A - Am - x_hat a) + B x_hat + C
        d/dgamma = m r (<A g> - Am <g> - q a)
        d/dx     = c1 (A - Am) + c2 (g - <g>) + c3 x_hat,
                   c1 = -gamma r^2 q,  c2 = r (B - gamma r a),
                   c3 = r (3 gamma r a q - B q - gamma r (<A g> - <g> Am)).
    (derived by differentiating dx through x_hat and r; checked against finite differences in
    tests/test_double_grad_ops.py). Every full-size term maps onto a fused native kernel:
    batch_norm_grad(out_grad=v, scale=s) = s r (v - <v> - x_hat <v x_hat>) and
    batch_norm(scale=s, bias=b) = s x_hat + b, so only <A g> needs an extra reduction. Per-channel
    broadcast arithmetic on full-size tensors is avoided on purpose: it is much slower on CPU here.
    """

    @staticmethod
    def forward(ctx, x, gamma, dy, stats):
        dx, dgamma, dbeta = _bn_backward(x, gamma, dy, stats)
        ctx.stats = stats
        # dgamma and dbeta are this layer's own outputs: saving them as they are would make a reference
        # cycle (output -> grad node -> ctx -> output) that Python's collector cannot see through, leaking
        # the whole adaptation graph of every meta-batch. Only their values are needed.
        ctx.save_for_backward(x, gamma, dy, dgamma.detach(), dbeta.detach())
        return dx, dgamma, dbeta

    @staticmethod
    def backward(ctx, dA, dB, dC):
        x, gamma, g, dgamma, dbeta = ctx.saved_tensor()
        s = ctx.stats
        m, r = float(s.count), s.inv_std
        q, g_mean = dgamma / m, dbeta / m
        zeros = _constant("zeros", gamma.shape[0], gamma.dtype)
        B = dB if dB is not None else zeros
        C = dC if dC is not None else zeros

        if dA is None:
            # A = 0: then c1 = 0, c2 = r B and c3 + c2 q = 0, so d/dx = bn_grad(g; scale=B).
            d_g = _bn_affine(x, B, C, s)
            d_x = _bn_backward(x, B, g, s)[0]
            return _needed((x, gamma, g), (d_x, None, d_g))

        dx_A, sum_A_xhat, sum_A = _bn_backward(x, gamma, dA, s)  # gamma r (A - Am - x_hat a), m a, m Am
        a, A_mean = sum_A_xhat / m, sum_A / m
        Ag_mean = _channel_dot(dA, g, s) / m

        d_g = dx_A + _bn_affine(x, B, C, s)
        # With D = <A g> - Am <g> - q a: d/dgamma = m r D, and the coefficients above simplify to
        # c1 / r = -gamma r q, c2 / r = B - gamma r a, c3 + c1 a + c2 q = -gamma r^2 D (fewer tiny ops).
        D = Ag_mean - A_mean * g_mean - q * a
        gr = gamma * r
        d_gamma = (m * r) * D
        if len(x.shape) == 5:
            # Blocked: the three terms expanded, d/dx = c1 A + c2 g + K x_hat - c1 Am - c2 <g> with
            # K = gamma r^2 (q a - D) - c2 q, as one affine pass over x and two accumulating passes (oneDNN has the
            # per-channel multiply-add Paddle lacks): a third of the time of the plain path's five kernels below.
            c1, c2 = -(gr * r) * q, r * (B - gr * a)
            d_x = _bn_affine(x, (gr * r) * (q * a - D) - c2 * q, -c1 * A_mean - c2 * g_mean, s)
            onednn_layers.add_scaled_(d_x, dA, c1)
            onednn_layers.add_scaled_(d_x, g, c2)
            return _needed((x, gamma, g), (d_x, d_gamma, d_g))
        # c1 (A - Am) = bn_grad(A; scale=c1/r) + c1 a x_hat, and likewise c2 (g - <g>) with q:
        d_x = (
            _bn_backward(x, -gr * q, dA, s)[0]
            + _bn_backward(x, B - gr * a, g, s)[0]
            + _bn_affine(x, -(gr * r) * D, zeros, s)
        )
        return _needed((x, gamma, g), (d_x, d_gamma, d_g))


def batch_norm(x, gamma, beta, eps=1e-5):
    """Batch norm with batch statistics (training mode, as MAML uses at train and test time), exact to
    second order in x, gamma and beta. No running statistics are kept."""
    return _BatchNorm.apply(x, gamma, beta, eps)


class _SupportBatchNorm(PyLayer):
    """Batch norm of every image with the statistics of the first `rows` images (the support set): the moments
    of those rows, then one affine pass over all of them with those moments given."""

    @staticmethod
    def forward(ctx, x, gamma, beta, rows, eps):
        _, mean, inv_std, variance = _bn_forward(x[:rows], gamma, beta, eps)
        ctx.stats = _BNStats(mean, inv_std, beta.detach(), eps, rows * x.shape[2] * x.shape[3], variance)
        ctx.rows = rows
        ctx.save_for_backward(x, gamma, beta)
        return _bn_affine(x, gamma, beta, ctx.stats)

    @staticmethod
    def backward(ctx, dy):
        x, gamma, beta = ctx.saved_tensor()
        return _needed((x, gamma, beta), _SupportBatchNormGrad.apply(x, gamma, dy, ctx.stats, ctx.rows))


class _SupportBatchNormGrad(PyLayer):
    """(dx, dgamma, dbeta) of _SupportBatchNorm. Per channel, with r = 1/std and x_hat of the support moments,
    G = sum(dy) and Q = sum(dy x_hat) over ALL images, m the support rows' element count:
        dx = gamma r dy, less gamma r (G + x_hat Q) / m on the support rows (their moments' share);
        dgamma = Q, dbeta = G.
    First order only: the query forward, its one user, is differentiated once (maml._query_gradients)."""

    @staticmethod
    def forward(ctx, x, gamma, dy, stats, rows):
        _, q, g = _bn_backward(x, gamma, dy, stats)  # its dx (normalised over all the rows) is not this one
        scaled = _bn_affine(dy, gamma * stats.inv_std, _constant("zeros", gamma.shape[0], dy.dtype), _unit(gamma, dy))
        share = -gamma * stats.inv_std / stats.count
        support = scaled[:rows] + _bn_affine(x[:rows], share * q, share * g, stats)
        return paddle.concat([support, scaled[rows:]], axis=0), q, g

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("batch_norm_by_support has no second derivative (only its first is used)")


def _unit(gamma, like):
    """Statistics (mean 0, variance 1, eps 0) that make _bn_affine(t, s, b, these) exactly s t + b."""
    channels = gamma.shape[0]
    zeros, ones = _constant("zeros", channels, like.dtype), _constant("ones", channels, like.dtype)
    return _BNStats(zeros, ones, zeros, 0.0, 1, variance=ones)


def batch_norm_by_support(x, gamma, beta, rows, eps=1e-5):
    """Batch norm of every image of x with the batch statistics of its first `rows` images (the support set;
    those rows come out as batch_norm of them alone). Exact to FIRST order only: a second derivative raises."""
    return _SupportBatchNorm.apply(x, gamma, beta, rows, eps)


# ------------------------------------------------------------------------------------------- max-pool
def _plain_pool(x):
    out, mask = cpu_schedule.max_pool2x2_with_index(x)
    # The kernel starts each window at (-FLT_MAX, index -1) and only replaces it with a larger value,
    # so a window of NaNs or -infs keeps index -1 (and outputs -FLT_MAX); the backward's scatter and
    # gather would then write and read one element before the plane, corrupting the heap. Clipping
    # once (an elementwise op on the quarter-size index) routes such a window to its plane's first
    # element: in bounds, and the values there are not finite anyway, which the trainer reports.
    # In place: the index is this call's own new tensor, and a clip into a new one costs several times as much
    # (doc/performance.md).
    mask.clip_(min=0, max=x.shape[-2] * x.shape[-1] - 1)
    return out, mask


def _plain_gather(ddx, mask):
    n, c, h, w = mask.shape
    # index_sample (a row-wise gather on [n*c, positions], int32 indices as they are) measured faster than
    # take_along_axis on the support-set shapes (doc/performance.md).
    return paddle.index_sample(ddx.reshape([n * c, -1]), mask.reshape([n * c, h * w])).reshape([n, c, h, w])


# The 2x2 max-pool's three kernels per layout: (pool(x) -> (out, where the maxima are), route(source, where,
# dout) -> dout scattered back to the maxima, gather(ddx, where) -> ddx read at the maxima). Plain NCHW: Paddle's
# kernels, the maxima as flat indices into each plane; its route takes the input x. Blocked: oneDNN's
# (onednn_layers), whose workspace holds an index within each window, so a window of NaNs still points inside it;
# its route needs only the input's shape.
_POOL_KERNELS = {
    "plain": (_plain_pool, kernels.max_pool2x2_with_index_grad, _plain_gather),
    "blocked": (onednn_layers.max_pool2x2, onednn_layers.max_pool2x2_grad, onednn_layers.max_pool2x2_gather),
}


def _layout(x):
    return "blocked" if len(x.shape) == 5 else "plain"


class _MaxPool2x2(PyLayer):
    @staticmethod
    def forward(ctx, x):
        ctx.layout = _layout(x)
        out, where = _POOL_KERNELS[ctx.layout][0](x.detach())
        if ctx.layout == "blocked":
            # Only the shape: the input (a batch norm's full-size output) is then freed after the forward, instead
            # of living as long as the graph (measured on config_paddlerec: Paddle's allocated peak per meta-iteration
            # 350 -> 274 MB first order, 459 -> 358 MB second order).
            ctx.source = list(x.shape)
            ctx.save_for_backward(where)
        else:
            ctx.save_for_backward(x, where)
        return out

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensor()
        source = ctx.source if ctx.layout == "blocked" else saved[0].detach()
        return _MaxPool2x2Grad.apply(dout, source, saved[-1], ctx.layout)


class _MaxPool2x2Grad(PyLayer):
    """Routing dout back to the window maxima: linear in dout, piecewise constant in x. Its derivative in
    dout is therefore the adjoint: the upstream gradient gathered at the same positions."""

    @staticmethod
    def forward(ctx, dout, source, where, layout):
        ctx.layout, ctx.dout_takes_gradient = layout, not dout.stop_gradient
        ctx.inputs = 3 if layout == "plain" else 2  # the tensors among the inputs (the blocked source is a shape)
        ctx.save_for_backward(where)
        return _POOL_KERNELS[layout][1](source, where, dout.detach())

    @staticmethod
    def backward(ctx, ddx):
        (where,) = ctx.saved_tensor()
        # The source is detached (or a shape) and `where` is an index: neither takes a gradient.
        d_dout = _POOL_KERNELS[ctx.layout][2](ddx.detach(), where) if ctx.dout_takes_gradient else None
        return (d_dout,) + (None,) * (ctx.inputs - 1)


def max_pool2d(x):
    """2x2 max-pool, stride 2, floor mode, exact to second order; x plain NCHW or blocked."""
    return _MaxPool2x2.apply(x)


class _MaxPool2x2ReLU(PyLayer):
    """relu(max-pool(x)) of blocked activations in one oneDNN pass (a ReLU post-op): no ReLU of its own, forward
    or backward, and no autograd node for it."""

    @staticmethod
    def forward(ctx, x):
        out, where = onednn_layers.max_pool2x2(x.detach(), relu=True)
        ctx.source = list(x.shape)
        # Detached: this layer's own output saved as it is would make a reference cycle (output -> grad node ->
        # ctx -> output) that leaks the graph (see _BatchNormGrad); the values are what the backward needs.
        ctx.save_for_backward(out.detach(), where)
        return out

    @staticmethod
    def backward(ctx, dout):
        out, where = ctx.saved_tensor()
        return _MaxPool2x2ReLUGrad.apply(dout, out, where, ctx.source)


class _MaxPool2x2ReLUGrad(PyLayer):
    """dout where the output is positive, routed to the window maxima: linear in dout, so its derivative is the
    adjoint, the upstream gradient gathered at the maxima where the output is positive."""

    @staticmethod
    def forward(ctx, dout, out, where, source):
        ctx.dout_takes_gradient = not dout.stop_gradient
        ctx.save_for_backward(out, where)
        return onednn_layers.max_pool2x2_grad(source, where, onednn_layers.relu_grad(dout.detach(), out))

    @staticmethod
    def backward(ctx, ddx):
        out, where = ctx.saved_tensor()
        if not ctx.dout_takes_gradient:
            return None, None, None
        return onednn_layers.relu_grad(onednn_layers.max_pool2x2_gather(ddx.detach(), where), out), None, None


def max_pool2d_relu(x):
    """relu(max_pool2d(x)), exact to second order; x plain NCHW or blocked (then one fused oneDNN op)."""
    if _layout(x) == "blocked":
        return _MaxPool2x2ReLU.apply(x)
    return F.relu(_MaxPool2x2.apply(x))


# -------------------------------------------------------------------------------------- cross-entropy
class _SoftmaxCrossEntropy(PyLayer):
    @staticmethod
    def forward(ctx, logits, one_hot):
        shift = logits.max(axis=-1, keepdim=True)
        z = logits - shift
        log_norm = paddle.log(paddle.exp(z).sum(axis=-1))
        ctx.save_for_backward(logits, one_hot)
        return log_norm - (z * one_hot).sum(axis=-1)

    @staticmethod
    def backward(ctx, dloss):
        # Recomputing the softmax here (rather than saving it) puts it on the graph, so the second
        # derivative dloss * (diag(p) - p p^T) comes from softmax's own first derivative, which every
        # Paddle version has (2.6 lacks double grads of exp and softmax).
        logits, one_hot = ctx.saved_tensor()
        p = F.softmax(logits, axis=-1)
        return _needed((logits, one_hot), ((p - one_hot) * dloss.unsqueeze(-1), None))


def cross_entropy(logits, labels):
    """Per-example softmax cross-entropy over the last axis, exact to second order in logits.
    `labels` holds integer class ids with the shape of logits minus the last axis."""
    one_hot = F.one_hot(labels.astype("int64"), logits.shape[-1]).astype(logits.dtype)
    return _SoftmaxCrossEntropy.apply(logits, one_hot)

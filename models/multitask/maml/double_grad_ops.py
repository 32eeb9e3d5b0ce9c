"""Network layers whose second derivatives are exact in Paddle dygraph, at native-kernel speed.

Why this module exists (measured on paddle 3.3.1, see doc/second_order.md):
- `F.conv2d`'s double backward silently drops the weight path when the layer input needs no gradient,
  so a MAML built on it is first-order without any error;
- `F.max_pool2d`, softmax and cross-entropy have no double backward at all;
- `F.batch_norm`'s double backward is correct but quadratic in the batch on CPU.

The recipe is the same for every layer: a `PyLayer` whose forward and backward call Paddle's fused native
kernels, where the backward is itself a `PyLayer` whose own backward (the second derivative) is written,
again, with native kernels. Each op here is exact to second order (what MAML needs); a third derivative is
not supported. Layout is NCHW throughout.
"""
import concurrent.futures
import os

import paddle
import paddle.nn.functional as F
from paddle import _C_ops
from paddle.autograd import PyLayer

__all__ = ["conv2d", "batch_norm", "max_pool2d", "cross_entropy", "recording_convolutions", "replay_seconds"]


def _needed(inputs, grads):
    """Paddle requires a PyLayer's backward to return None for inputs that take no gradient."""
    return tuple(None if t.stop_gradient else g for t, g in zip(inputs, grads))


# --------------------------------------------------------------------------------------------- conv2d
def _conv_args(ctx):
    return ([ctx.stride] * 2, [ctx.padding] * 2, "EXPLICIT", [1, 1], ctx.groups, "NCHW")


# Paddle's CPU convolution runs on one core (its im2col + small GEMMs do not use MKL's threads), and
# the machine this was tuned on has two. Each native convolution call is therefore split in two
# independent halves run at once: one in a worker thread (Paddle releases the GIL inside kernels) and
# one in the calling thread. Large batches split on the batch axis (contiguous halves: the forward
# output and the input gradient are concatenated, the weight gradients added); small batches (the
# support set) split on the task groups, which balances 5 images better than 3 + 2. The halves see
# detached tensors: every derivative here goes through the PyLayers, never through the native ops.
# MAML_CONV_THREADS=1 turns the splitting off (e.g. on a machine whose other core is busy).
CONV_THREADS = int(os.environ.get("MAML_CONV_THREADS", min(2, os.cpu_count() or 1)))
_BATCH_SPLIT_MIN = 8
_executor = None


def _mkl_local_threads():
    """MKL's per-thread thread-count setter, or None. Each half of a split convolution must run its GEMMs
    on one thread: with Paddle's CPU threads set to 2 (tools: runner.num_threads 0 = all cores), two
    halves of two MKL threads each oversubscribe two cores and run slower than no split at all
    (measured: 2.9 s vs 1.9 s per first-order meta-iteration)."""
    try:
        import ctypes

        lib = ctypes.CDLL(os.path.join(os.path.dirname(paddle.__file__), "libs", "libmklml_intel.so"))
        return lib.MKL_Set_Num_Threads_Local
    except (OSError, AttributeError):
        return None


_set_mkl_local_threads = _mkl_local_threads()


def _single_threaded(fn, *args):
    """fn(*args) with MKL limited to this thread (restored afterwards)."""
    if _set_mkl_local_threads is None:
        return fn(*args)
    previous = _set_mkl_local_threads(1)
    try:
        return fn(*args)
    finally:
        _set_mkl_local_threads(previous)


def _submit(fn, *args):
    global _executor
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="conv")
    return _executor.submit(_single_threaded, fn, *args)


def _split_plan(n, groups, channels_per_group, gradient):
    """'batch', 'groups' or None: how to cut one convolution call in two.

    With one input channel per group (the first layer) a convolution does 18 flops per output element,
    so copying the halves' output together costs more than the second core saves (measured: 3.6 ->
    5.4 ms forward); its weight gradient still gains when the batch is large (13 -> 8 ms at 75 images).
    """
    if CONV_THREADS < 2:
        return None
    if channels_per_group < 8 and not (gradient and n >= _BATCH_SPLIT_MIN):
        return None
    if n >= _BATCH_SPLIT_MIN:
        return "batch"
    if groups % 2 == 0:
        return "groups"
    return "batch" if n >= 2 else None


def _run_conv(x, w, args):
    x, w = x.detach(), w.detach()
    plan = _split_plan(x.shape[0], args[4], w.shape[1], gradient=False) if x.place.is_cpu_place() else None
    if plan == "batch":
        h = (x.shape[0] + 1) // 2
        other = _submit(_C_ops.conv2d, x[h:], w, *args)
        return paddle.concat([_single_threaded(_C_ops.conv2d, x[:h], w, *args), other.result()], axis=0)
    if plan == "groups":
        half, ci, co = args[4] // 2, x.shape[1] // 2, w.shape[0] // 2
        sub = args[:4] + (half,) + args[5:]
        other = _submit(_C_ops.conv2d, x[:, ci:], w[co:], *sub)
        return paddle.concat([_single_threaded(_C_ops.conv2d, x[:, :ci], w[:co], *sub), other.result()], axis=1)
    return _C_ops.conv2d(x, w, *args)


def _run_conv_grad(x, w, dy, args):
    x, w, dy = x.detach(), w.detach(), dy.detach()
    # The two-thread split is for CPU kernels that use one core; a GPU call runs whole.
    plan = _split_plan(x.shape[0], args[4], w.shape[1], gradient=True) if x.place.is_cpu_place() else None
    if plan == "batch":
        h = (x.shape[0] + 1) // 2
        other = _submit(_C_ops.conv2d_grad, x[h:], w, dy[h:], *args)
        dx0, dw0 = _single_threaded(_C_ops.conv2d_grad, x[:h], w, dy[:h], *args)
        dx1, dw1 = other.result()
        return paddle.concat([dx0, dx1], axis=0), dw0 + dw1
    if plan == "groups":
        half, ci, co = args[4] // 2, x.shape[1] // 2, w.shape[0] // 2
        sub = args[:4] + (half,) + args[5:]
        other = _submit(_C_ops.conv2d_grad, x[:, ci:], w[co:], dy[:, co:], *sub)
        dx0, dw0 = _single_threaded(_C_ops.conv2d_grad, x[:, :ci], w[:co], dy[:, :co], *sub)
        dx1, dw1 = other.result()
        return paddle.concat([dx0, dx1], axis=1), paddle.concat([dw0, dw1], axis=0)
    return _C_ops.conv2d_grad(x, w, dy, *args)


# While a benchmark records, every convolution call appends (kernel, argument shapes, settings), so the
# same calls can be replayed bare, split and threaded exactly as above, and the time outside them
# measured (tools/benchmark.py).
_recorded_calls = None


def _conv(x, w, ctx):
    if _recorded_calls is not None:
        _recorded_calls.append(("conv2d", (x.shape, w.shape), _conv_args(ctx)))
    return _run_conv(x, w, _conv_args(ctx))


def _conv_grad(x, w, dy, ctx):
    """Native (d/dx, d/dw) of sum(dy * conv(x, w)); one kernel call (per half) gives both."""
    if _recorded_calls is not None:
        _recorded_calls.append(("conv2d_grad", (x.shape, w.shape, dy.shape), _conv_args(ctx)))
    return _run_conv_grad(x, w, dy, _conv_args(ctx))


class recording_convolutions:
    """Context manager collecting the native convolution calls made inside it (a list of records)."""

    def __enter__(self):
        global _recorded_calls
        _recorded_calls = self.calls = []
        return self.calls

    def __exit__(self, *exc):
        global _recorded_calls
        _recorded_calls = None


def replay_seconds(calls, dtype, repeats=3):
    """Median wall time of running the recorded convolution kernels bare, on random inputs."""
    import time

    # One random tensor per distinct shape, shared by the calls that take that shape (the chunks of a
    # meta-batch repeat the same shapes): the replay's own memory then stays near one chunk's, instead of
    # holding every call's inputs at once and inflating the peak memory the benchmark reports.
    pool = {}

    def tensor(shape):
        key = tuple(shape)
        if key not in pool:
            pool[key] = paddle.randn(list(shape), dtype=dtype)
        return pool[key]

    inputs = [[tensor(shape) for shape in shapes] for _, shapes, _ in calls]
    kernels = {"conv2d": _run_conv, "conv2d_grad": _run_conv_grad}
    times = []
    for _ in range(repeats + 1):  # the first round warms up
        start = time.perf_counter()
        for (kind, _, args), tensors in zip(calls, inputs):
            kernels[kind](*tensors, args)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


class _Conv2D(PyLayer):
    @staticmethod
    def forward(ctx, x, w, stride, padding, groups):
        ctx.stride, ctx.padding, ctx.groups = stride, padding, groups
        ctx.save_for_backward(x, w)
        return _conv(x, w, ctx)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensor()
        dx, dw = _Conv2DGrad.apply(x, w, dy, ctx.stride, ctx.padding, ctx.groups)
        return _needed((x, w), (dx, dw))


class _Conv2DGrad(PyLayer):
    """(dx, dw) = conv-backward(x, w, dy) as a differentiable function of x, w and dy."""

    @staticmethod
    def forward(ctx, x, w, dy, stride, padding, groups):
        ctx.stride, ctx.padding, ctx.groups = stride, padding, groups
        ctx.save_for_backward(x, w, dy)
        return _conv_grad(x, w, dy, ctx)

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
        d_dy = _conv(x, ddw, ctx) if ddw is not None else None
        if ddx is not None:
            d_dy = _conv(ddx, w, ctx) if d_dy is None else d_dy + _conv(ddx, w, ctx)
        d_x = d_w = None
        if ddw is not None and ddx is not None:
            d_x, d_w = _conv_grad(ddx, ddw, dy, ctx)
        elif ddw is not None and not x.stop_gradient:  # the first layer's input (data) takes none
            d_x = _conv_grad(x, ddw, dy, ctx)[0]
        elif ddx is not None:
            d_w = _conv_grad(ddx, w, dy, ctx)[1]
        return _needed((x, w, dy), (d_x, d_w, d_dy))


def conv2d(x, weight, stride=1, padding=1, groups=1):
    """`F.conv2d` (no bias) with an exact second derivative in x and weight."""
    return _Conv2D.apply(x, weight, stride, padding, groups)


# ----------------------------------------------------------------------------------------- batch norm
class _BNStats:
    """Per-channel batch statistics of one batch-norm call, carried outside the autograd inputs: their
    dependence on x is accounted for analytically in the formulas below."""

    def __init__(self, mean, inv_std, beta, eps, count):
        self.mean, self.inv_std, self.beta, self.eps, self.count = mean, inv_std, beta, eps, count


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
    """(scale * x_hat + bias, mean, 1/std) with x_hat normalised by the batch statistics of x."""
    channels = x.shape[1]
    running_mean = _constant("running_mean", channels, x.dtype)
    running_var = _constant("running_var", channels, x.dtype)
    out, _, _, mean, inv_std, _ = _C_ops.batch_norm(
        x, running_mean, running_var, scale, bias, False, 0.9, eps, "NCHW", False, False
    )
    return out, mean, inv_std


def _bn_affine(x, scale, bias, stats):
    """scale * x_hat + bias with the statistics already known: batch_norm in global-statistics mode skips
    the statistics pass (measured 2x faster than recomputing them: 0.09 vs 0.18 ms on 5 x 256 x 28 x 28)."""
    if getattr(stats, "variance", None) is None:
        stats.variance = 1.0 / (stats.inv_std * stats.inv_std) - stats.eps  # so that 1/sqrt(var + eps) = r
    return _C_ops.batch_norm(
        x, stats.mean, stats.variance, scale, bias, True, 0.9, stats.eps, "NCHW", True, False
    )[0]


def _bn_backward(x, scale, dy, stats):
    """Native batch-norm backward: (scale*r*(dy - <dy> - x_hat<dy x_hat>), sum(dy x_hat), sum(dy))."""
    return _C_ops.batch_norm_grad(
        x, scale, stats.beta, stats.mean, stats.inv_std, stats.mean, stats.inv_std, None, dy,
        0.9, stats.eps, "NCHW", False, False, False,
    )


class _BatchNorm(PyLayer):
    @staticmethod
    def forward(ctx, x, gamma, beta, eps):
        out, mean, inv_std = _bn_forward(x, gamma, beta, eps)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        ctx.stats = _BNStats(mean, inv_std, beta.detach(), eps, count)
        ctx.save_for_backward(x, gamma, beta)
        return out

    @staticmethod
    def backward(ctx, dy):
        x, gamma, beta = ctx.saved_tensor()
        return _needed((x, gamma, beta), _BatchNormGrad.apply(x, gamma, dy, ctx.stats))


def _channel_dot(a, b, stats):
    """Per-channel sum(a * b) over N, H, W. A reduction op (`(a * b).sum(axis=[0, 2, 3])`) is ~4x slower on
    CPU than batch_norm_grad, whose scale gradient is sum(dy * (x - mean) * inv_std): with x = b, mean 0
    and inv_std 1 that is exactly sum(a * b)."""
    zeros = _constant("zeros", b.shape[1], b.dtype)
    ones = _constant("ones", b.shape[1], b.dtype)
    return _C_ops.batch_norm_grad(
        b, ones, zeros, zeros, ones, zeros, ones, None, a, 0.9, stats.eps, "NCHW", False, False, False,
    )[1]


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
    broadcast arithmetic on full-size tensors is avoided on purpose: it is ~10x slower on CPU here.
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


# ------------------------------------------------------------------------------------------- max-pool
def _pool_kernel(x):
    return _C_ops.max_pool2d_with_index(x, [2, 2], [2, 2], [0, 0], False, False, False)


def _pool_with_index(x):
    """Native 2x2 max-pool with argmax indices. Large batches (the query set) run as two batch halves on
    both cores, like the convolutions: the outputs are a quarter of the input, so joining them is cheap
    (measured on 75 x 256 x 28 x 28: 9.6 -> 6.8 ms)."""
    if CONV_THREADS < 2 or x.shape[0] < _BATCH_SPLIT_MIN:
        return _pool_kernel(x)
    h = (x.shape[0] + 1) // 2
    other = _submit(_pool_kernel, x[h:])
    out0, mask0 = _pool_kernel(x[:h])
    out1, mask1 = other.result()
    return paddle.concat([out0, out1], axis=0), paddle.concat([mask0, mask1], axis=0)


class _MaxPool2x2(PyLayer):
    @staticmethod
    def forward(ctx, x):
        out, mask = _pool_with_index(x.detach())
        # The kernel starts each window at (-FLT_MAX, index -1) and only replaces it with a larger value,
        # so a window of NaNs or -infs keeps index -1 (and outputs -FLT_MAX); the backward's scatter and
        # gather would then write and read one element before the plane, corrupting the heap. Clipping
        # once (an elementwise op on the quarter-size index) routes such a window to its plane's first
        # element: in bounds, and the values there are not finite anyway, which the trainer reports.
        mask = paddle.clip(mask, min=0)
        ctx.save_for_backward(x, mask)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, mask = ctx.saved_tensor()
        return _MaxPool2x2Grad.apply(dout, x.detach(), mask)


class _MaxPool2x2Grad(PyLayer):
    """Routing dout back to the argmax positions: linear in dout, piecewise constant in x. Its
    derivative in dout is therefore the gather of the upstream gradient at the same positions."""

    @staticmethod
    def forward(ctx, dout, x, mask):
        ctx.save_for_backward(mask, dout)
        return _C_ops.max_pool2d_with_index_grad(x, mask, dout, [2, 2], [2, 2], [0, 0], False, False, False)

    @staticmethod
    def backward(ctx, ddx):
        mask, dout = ctx.saved_tensor()
        n, c, h, w = mask.shape
        # index_sample (a row-wise gather on [n*c, positions], int32 indices as they are) measured ~25%
        # faster than take_along_axis on the support-set shapes.
        gathered = paddle.index_sample(ddx.reshape([n * c, -1]), mask.reshape([n * c, h * w]))
        # x is passed detached and the mask is an index: neither takes a gradient.
        return _needed((dout,), (gathered.reshape([n, c, h, w]),)) + (None, None)


def max_pool2d(x):
    """2x2 max-pool, stride 2, floor mode, exact to second order."""
    return _MaxPool2x2.apply(x)


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

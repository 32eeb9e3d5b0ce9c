"""oneDNN's batch norm and 2x2 max-pool on channel-blocked activations (see onednn_conv's blocked tensors).

Why: on this model's activations Paddle's NCHW kernels for these layers take as long as the convolutions
around them (and one core: they are not split). oneDNN's code for the blocked layout reads each channel
block with vector loads, and is faster than Paddle's on these shapes (doc/performance.md); on plain NCHW it
is slower, so only blocked tensors come here.

Every function takes and returns blocked tensors ([N, C / b, H, W, b], float32, CPU) and per-channel
float32 vectors; nothing here is differentiable (double_grad_ops.py composes these kernels into exactly
differentiated layers, as it does Paddle's).
"""
import ctypes
import math
import threading

import paddle

from . import cpu_schedule
from . import onednn_conv as dnn

_BACKWARD = 128
_FORWARD_INFERENCE = 96
_USE_GLOBAL_STATS, _USE_SCALE, _USE_SHIFT = 0x1, 0x2, 0x4
_POOLING_MAX, _POOLING_AVG = 0x1FF, 0x2FF  # avg: include padding (there is none here)
_ARG_MEAN, _ARG_VARIANCE, _ARG_SCALE, _ARG_SHIFT = 49, 50, 51, 52
_ARG_WORKSPACE = 64
_ARG_DIFF_SCALE, _ARG_DIFF_SHIFT = 255, 256
_ARG_SRC_1 = 2
_BINARY_MUL = 0x1FFF1
_ELTWISE_RELU, _ELTWISE_RELU_USE_DST = 0x20, 0x100

_primitives = {}

# From this many elements a call runs on two OpenMP threads (the support set's first layer, 5 x 256 x 28 x 28,
# and everything larger); the threshold is measured (doc/performance.md), smaller calls stay on one thread.
# oneDNN fixes a primitive's thread count when it is created, so the count is part of the cache key. These calls
# never overlap a split convolution's halves (cpu_schedule), which are the other users of the second core.
_TWO_THREADS_FROM = 1 << 18


def _threads(shape):
    """OpenMP threads for a call on `shape`: two from _TWO_THREADS_FROM elements, unless the convolutions are
    kept to one core too (MAML_CONV_THREADS=1, e.g. two data-parallel ranks on two cores)."""
    return 2 if cpu_schedule.conv_threads() >= 2 and math.prod(shape) >= _TWO_THREADS_FROM else 1


def _cached(key, shape, create):
    """The primitives `create()` makes for `key`, created once, with the OpenMP thread count for `shape` (as the
    attribute `threads` of each)."""
    threads = _threads(shape)
    key = key + (threads,)
    found = _primitives.get(key)
    if found is None:
        with dnn._lock:
            found = _primitives.get(key)
            if found is None:
                with dnn.openmp_threads(threads):
                    found = create()
                for primitive in found if isinstance(found, tuple) else (found,):
                    if isinstance(primitive, dnn._Primitive):
                        primitive.threads = threads
                _primitives[key] = found
    return found


_thread_state = threading.local()


def _prepare_thread(primitive):
    """Before a two-thread call: OpenMP's helper thread then sleeps as soon as the call ends. By default it
    spins a while waiting for more work, on the core that the next split convolution's worker thread needs
    (doc/performance.md). The setting belongs to the calling thread, which forks the team."""
    if primitive.threads > 1 and not getattr(_thread_state, "blocktime_zero", False):
        set_blocktime = getattr(dnn._libs[1], "kmp_set_blocktime", None)
        if set_blocktime is not None:
            set_blocktime(0)
        _thread_state.blocktime_zero = True


def _execute(primitive, args):
    """primitive.execute(args) on the primitive's thread count."""
    _prepare_thread(primitive)
    with dnn.openmp_threads(primitive.threads):
        primitive.execute(args)


def _run(primitive, tensors):
    """primitive.run(tensors) on the primitive's thread count."""
    _prepare_thread(primitive)
    primitive.run(tensors, primitive.threads)


def _activation(shape, block):
    return dnn._descriptor(shape, dnn._TAG_BLOCKED[block])


def _vector(channels):
    return dnn._descriptor([channels], dnn._TAG_A)


def _layout(tensor_shape):
    """(logical NCHW shape, block) of a blocked tensor's shape."""
    if len(tensor_shape) != 5:
        raise ValueError(f"expected a blocked [N, C/b, H, W, b] tensor, got shape {list(tensor_shape)}")
    n, cb, h, w, b = tensor_shape
    return (n, cb * b, h, w), b


def _batch_norm(shape, block, epsilon, flags):
    """(forward, backward) batch-norm primitives; `flags` adds _USE_GLOBAL_STATS for the forward with given
    statistics (which then has no backward here)."""
    def create():
        dnnl, engine = dnn._libs[0], dnn._setup()
        data, stats = _activation(list(shape), block), _vector(shape[1])
        kind = _FORWARD_INFERENCE if flags & _USE_GLOBAL_STATS else dnn._FORWARD_TRAINING
        plain = {dnn._ARG_SRC: data, dnn._ARG_DST: data, _ARG_MEAN: stats, _ARG_VARIANCE: stats,
                 _ARG_SCALE: stats, _ARG_SHIFT: stats}
        forward = dnn._Primitive(lambda pd: dnnl.dnnl_batch_normalization_forward_primitive_desc_create(
            pd, engine, kind, data, data, epsilon, flags, dnn._attr), plain)
        if flags & _USE_GLOBAL_STATS:
            return forward, None
        plain = {dnn._ARG_SRC: data, dnn._ARG_DIFF_DST: data, _ARG_MEAN: stats, _ARG_VARIANCE: stats,
                 _ARG_SCALE: stats, dnn._ARG_DIFF_SRC: data, _ARG_DIFF_SCALE: stats, _ARG_DIFF_SHIFT: stats}
        backward = dnn._Primitive(lambda pd: dnnl.dnnl_batch_normalization_backward_primitive_desc_create(
            pd, engine, _BACKWARD, data, data, data, epsilon, _USE_SCALE | _USE_SHIFT, forward.pd, dnn._attr),
            plain)
        return forward, backward
    return _cached(("bn", shape, block, float(epsilon), flags), shape, create)


def _c(t):
    return t.contiguous()


def batch_norm_training(x, scale, shift, *, epsilon):
    """(scale * x_hat + shift, batch mean, batch variance) per channel, x_hat normalised by x's batch statistics."""
    shape, block = _layout(x.shape)
    forward, _ = _batch_norm(shape, block, epsilon, _USE_SCALE | _USE_SHIFT)
    out = dnn.empty(x.shape, x.dtype)
    mean = dnn.empty([shape[1]], x.dtype)
    variance = dnn.empty([shape[1]], x.dtype)
    _run(forward, {dnn._ARG_SRC: _c(x), dnn._ARG_DST: out, _ARG_MEAN: mean, _ARG_VARIANCE: variance,
                 _ARG_SCALE: _c(scale), _ARG_SHIFT: _c(shift)})
    return out, mean, variance


def batch_norm_given_statistics(x, scale, shift, mean, variance, *, epsilon):
    """scale * (x - mean) / sqrt(variance + epsilon) + shift per channel, with the statistics given."""
    shape, block = _layout(x.shape)
    forward, _ = _batch_norm(shape, block, epsilon, _USE_GLOBAL_STATS | _USE_SCALE | _USE_SHIFT)
    out = dnn.empty(x.shape, x.dtype)
    _run(forward, {dnn._ARG_SRC: _c(x), dnn._ARG_DST: out, _ARG_MEAN: _c(mean), _ARG_VARIANCE: _c(variance),
                 _ARG_SCALE: _c(scale), _ARG_SHIFT: _c(shift)})
    return out


def batch_norm_grad(x, scale, mean, variance, out_grad, *, epsilon):
    """Training-mode batch-norm backward with the batch statistics (mean, variance): (dx, dscale, dshift) =
    (scale r (g - <g> - x_hat <g x_hat>), sum(g x_hat), sum(g)) per channel, r = 1 / sqrt(variance + epsilon),
    g = out_grad."""
    shape, block = _layout(x.shape)
    _, backward = _batch_norm(shape, block, epsilon, _USE_SCALE | _USE_SHIFT)
    dx = dnn.empty(x.shape, x.dtype)
    dscale = dnn.empty([shape[1]], x.dtype)
    dshift = dnn.empty([shape[1]], x.dtype)
    _run(backward, {dnn._ARG_SRC: _c(x), dnn._ARG_DIFF_DST: _c(out_grad), _ARG_MEAN: _c(mean),
                  _ARG_VARIANCE: _c(variance), _ARG_SCALE: _c(scale), dnn._ARG_DIFF_SRC: dx,
                  _ARG_DIFF_SCALE: dscale, _ARG_DIFF_SHIFT: dshift})
    return dx, dscale, dshift


def _attributes_with(append):
    """Primitive attributes (user scratchpad, as dnn._attr) with the post-ops `append(post_ops)` adds; the caller
    destroys them (dnnl_primitive_attr_destroy) once its primitive descriptor, which keeps a copy, is made."""
    dnnl = dnn._libs[0]
    attr, post_ops = ctypes.c_void_p(), ctypes.c_void_p()
    dnn._check(dnnl.dnnl_primitive_attr_create(ctypes.byref(attr)), "attributes")
    try:
        dnn._check(dnnl.dnnl_primitive_attr_set_scratchpad_mode(attr, dnn._SCRATCHPAD_USER), "scratchpad mode")
        dnn._check(dnnl.dnnl_post_ops_create(ctypes.byref(post_ops)), "post-ops")
        append(post_ops)
        dnn._check(dnnl.dnnl_primitive_attr_set_post_ops(attr, post_ops), "post-ops")
    except dnn.OneDNNError:
        dnnl.dnnl_primitive_attr_destroy(attr)
        raise
    finally:
        if post_ops:
            dnnl.dnnl_post_ops_destroy(post_ops)
    return attr


def _accumulation(shape, block):
    """A binary primitive computing dst += src * scale, the scale per channel (a multiply, then a sum post-op)."""
    def create():
        dnnl, engine = dnn._libs[0], dnn._setup()
        data = _activation(list(shape), block)
        vector = _activation([1, shape[1], 1, 1], block)  # C floats in a row, as the [C] scale tensor holds them
        # 1.0: dst's previous values unscaled; 0: no zero point; 0: dst's own data type
        attr = _attributes_with(lambda post_ops: dnn._check(dnnl.dnnl_post_ops_append_sum(post_ops, 1.0, 0, 0),
                                                              "sum post-op"))
        try:
            return dnn._Primitive(lambda pd: dnnl.dnnl_binary_primitive_desc_create(
                pd, engine, _BINARY_MUL, data, vector, data, attr), {}), data, vector
        finally:
            dnnl.dnnl_primitive_attr_destroy(attr)
    return _cached(("accumulate", shape, block), shape, create)


def add_scaled_(out, t, scale):
    """out += t * scale, the scale per channel ([C]); out (made by this module: contiguous) is updated in place
    and returned. One pass, where Paddle needs a broadcast multiply and an add."""
    shape, block = _layout(out.shape)
    primitive, data, vector = _accumulation(shape, block)
    _execute(primitive, {dnn._ARG_SRC: (data, _c(t)), _ARG_SRC_1: (vector, _c(scale)), dnn._ARG_DST: (data, out)})
    return out


def pooled_shape(shape):
    """2x2 windows, stride 2, floor mode (a trailing odd row or column is dropped, as in F.max_pool2d)."""
    n, c, h, w = shape
    return [n, c, h // 2, w // 2]


def _pooling(shape, block, algorithm):
    """(forward, backward) pooling primitives, and the workspace's size in bytes (max only)."""
    def create():
        dnnl, engine = dnn._libs[0], dnn._setup()
        out_shape = pooled_shape(list(shape))
        src, dst = _activation(list(shape), block), _activation(out_shape, block)
        # No padding: oneDNN's output size (H - 2) // 2 + 1 is then floor mode's, and an odd last row or column
        # is in no window (its gradient is zero).
        window, none = dnn._dims([2, 2]), dnn._dims([0, 0])
        pad_r = none
        kind = dnn._FORWARD_TRAINING if algorithm == _POOLING_MAX else _FORWARD_INFERENCE
        forward = dnn._Primitive(lambda pd: dnnl.dnnl_pooling_forward_primitive_desc_create(
            pd, engine, kind, algorithm, src, dst, window, window, none, none, pad_r, dnn._attr),
            {dnn._ARG_SRC: src, dnn._ARG_DST: dst})
        if algorithm != _POOLING_MAX:
            return forward, None, None, 0
        workspace = ctypes.c_void_p(dnnl.dnnl_primitive_desc_query_md(forward.pd, dnn._QUERY_EXEC_ARG_MD,
                                                                       _ARG_WORKSPACE))
        backward = dnn._Primitive(lambda pd: dnnl.dnnl_pooling_backward_primitive_desc_create(
            pd, engine, algorithm, src, dst, window, window, none, none, pad_r, forward.pd, dnn._attr),
            {dnn._ARG_DIFF_SRC: src, dnn._ARG_DIFF_DST: dst})
        return forward, backward, workspace, dnnl.dnnl_memory_desc_get_size(workspace)
    return _cached(("pool", shape, block, algorithm), shape, create)


def _pooling_relu(shape, block):
    """The max-pool forward primitive with a ReLU post-op: relu(max-pool(x)) in one pass, with the workspace of
    _pooling's (checked), which its backward reads."""
    def create():
        dnnl, engine = dnn._libs[0], dnn._setup()
        src, dst = _activation(list(shape), block), _activation(pooled_shape(list(shape)), block)
        window, none = dnn._dims([2, 2]), dnn._dims([0, 0])
        # alpha 0 (no leak), beta unused
        attr = _attributes_with(lambda post_ops: dnn._check(
            dnnl.dnnl_post_ops_append_eltwise(post_ops, _ELTWISE_RELU, 0.0, 0.0), "eltwise post-op"))
        try:
            forward = dnn._Primitive(lambda pd: dnnl.dnnl_pooling_forward_primitive_desc_create(
                pd, engine, dnn._FORWARD_TRAINING, _POOLING_MAX, src, dst, window, window, none, none, none, attr),
                {dnn._ARG_SRC: src, dnn._ARG_DST: dst})
        finally:
            dnnl.dnnl_primitive_attr_destroy(attr)
        workspace = ctypes.c_void_p(dnnl.dnnl_primitive_desc_query_md(forward.pd, dnn._QUERY_EXEC_ARG_MD,
                                                                       _ARG_WORKSPACE))
        if not dnnl.dnnl_memory_desc_equal(workspace, _pooling(shape, block, _POOLING_MAX)[2]):
            raise dnn.OneDNNError("max-pool with a ReLU post-op has a workspace of another layout")
        return forward
    return _cached(("pool_relu", shape, block), shape, create)


def max_pool2x2(x, relu=False):
    """(2x2 max-pool of x, oneDNN's workspace: which element of each window is the maximum); with `relu`,
    relu(max-pool(x)) in the same pass (the workspace is the same)."""
    shape, block = _layout(x.shape)
    forward, _, workspace_md, size = _pooling(shape, block, _POOLING_MAX)
    if relu:
        forward = _pooling_relu(shape, block)
    out = dnn.empty(dnn.tensor_shape(pooled_shape(list(shape)), block), x.dtype)
    workspace = dnn.empty([size], paddle.uint8)
    _execute(forward, {dnn._ARG_SRC: (forward.plain[dnn._ARG_SRC], _c(x)),
                     dnn._ARG_DST: (forward.plain[dnn._ARG_DST], out),
                     _ARG_WORKSPACE: (workspace_md, workspace)})
    return out, workspace


def max_pool2x2_grad(x_shape, workspace, out_grad):
    """out_grad routed back to the window maxima the workspace records, zeros elsewhere: a tensor of
    x_shape (the blocked input's shape)."""
    shape, block = _layout(x_shape)
    _, backward, workspace_md, _ = _pooling(shape, block, _POOLING_MAX)
    # An odd last row or column is in no window; oneDNN's documentation does not say that its backward writes
    # such elements (it did here), so they start at zero (only odd sizes, which are small here).
    odd = shape[2] % 2 or shape[3] % 2
    dx = paddle.zeros(x_shape, dtype=out_grad.dtype) if odd else dnn.empty(x_shape, out_grad.dtype)
    _execute(backward, {dnn._ARG_DIFF_DST: (backward.plain[dnn._ARG_DIFF_DST], _c(out_grad)),
                      dnn._ARG_DIFF_SRC: (backward.plain[dnn._ARG_DIFF_SRC], dx),
                      _ARG_WORKSPACE: (workspace_md, workspace)})
    return dx


def max_pool2x2_gather(x_grad, workspace):
    """The adjoint of max_pool2x2_grad: each window's value of x_grad at its maximum (pooled shape). The
    0/1 mask of the maxima (the routing of ones) times x_grad leaves one non-zero per window, so the window's
    mean times 4 is that value, exactly (a power of two)."""
    shape, block = _layout(x_grad.shape)
    pooled = dnn.tensor_shape(pooled_shape(list(shape)), block)
    mask = max_pool2x2_grad(x_grad.shape, workspace, paddle.ones(pooled, dtype=x_grad.dtype))
    forward, _, _, _ = _pooling(shape, block, _POOLING_AVG)
    out = dnn.empty(pooled, x_grad.dtype)
    _run(forward, {dnn._ARG_SRC: _c(x_grad * mask), dnn._ARG_DST: out})
    return out * 4.0


def _relu_backward(shape, block):
    def create():
        dnnl, engine = dnn._libs[0], dnn._setup()
        data = _activation(list(shape), block)
        hint = ctypes.c_void_p()  # the backward's required forward hint; alpha 0 (no leak), beta unused
        dnn._check(dnnl.dnnl_eltwise_forward_primitive_desc_create(
            ctypes.byref(hint), engine, dnn._FORWARD_TRAINING, _ELTWISE_RELU_USE_DST, data, data, 0.0, 0.0,
            dnn._attr), "eltwise forward")
        try:
            return dnn._Primitive(lambda pd: dnnl.dnnl_eltwise_backward_primitive_desc_create(
                pd, engine, _ELTWISE_RELU_USE_DST, data, data, data, 0.0, 0.0, hint, dnn._attr), {}), data
        finally:
            dnnl.dnnl_primitive_desc_destroy(hint)
    return _cached(("relu_backward", shape, block), shape, create)


def relu_grad(out_grad, out):
    """out_grad where out (a ReLU's output) is positive, 0 elsewhere."""
    shape, block = _layout(out.shape)
    backward, data = _relu_backward(shape, block)
    dx = dnn.empty(out.shape, out.dtype)
    _execute(backward, {dnn._ARG_DST: (data, _c(out)), dnn._ARG_DIFF_DST: (data, _c(out_grad)),
                        dnn._ARG_DIFF_SRC: (data, dx)})
    return dx


def _reordering(shape, block, to_blocked):
    def create():
        plain, blocked = dnn._descriptor(list(shape), dnn._TAG_ABCD), _activation(list(shape), block)
        return dnn._reorder(plain, blocked) if to_blocked else dnn._reorder(blocked, plain)
    return _cached(("reorder", shape, block, to_blocked), shape, create)


def blocked(x, block):
    """A plain NCHW tensor in the channel-blocked layout (the tensor [N, C / block, H, W, block])."""
    shape = tuple(x.shape)
    reorder = _reordering(shape, block, True)
    out = dnn.empty(dnn.tensor_shape(list(shape), block), x.dtype)
    _execute(reorder, {dnn._ARG_FROM: (reorder.source, _c(x)), dnn._ARG_TO: (reorder.target, out)})
    return out


def plain(x):
    """A blocked tensor as plain NCHW."""
    shape, block = _layout(x.shape)
    reorder = _reordering(shape, block, False)
    out = dnn.empty(list(shape), x.dtype)
    _execute(reorder, {dnn._ARG_FROM: (reorder.source, _c(x)), dnn._ARG_TO: (reorder.target, out)})
    return out

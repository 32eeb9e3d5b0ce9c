"""Convolutions on a CPU through oneDNN, the library Paddle itself ships (paddle/libs/libdnnl.so.3).

Why: Paddle's own CPU convolution is im2col, then one small GEMM per image and per group; oneDNN's direct
convolution code (JIT-compiled for the CPU it runs on: AVX2, AVX-512, ..., whatever the vendor) is faster
on this model's layers once its operands are in its channel-blocked layout (doc/performance.md). Paddle's
dygraph never selects its own oneDNN kernels for a plain CPU tensor (FLAGS_use_onednn / FLAGS_use_mkldnn change
nothing there: oneDNN's verbose log stays empty), hence this module.

This module calls oneDNN's C API with ctypes on the tensors' own memory, so no compiler is involved; where
oneDNN wants a blocked layout, the operands are reordered into scratch buffers and the results back to
NCHW. Inputs and outputs may be channel slices of larger NCHW tensors (oneDNN reads and writes them through
strides), so the two halves of a split convolution need no copy in and no concat out. Every call here is float32 on the
CPU; anything else (float64 in the finite-difference tests, GPU tensors), a Paddle without libdnnl, or a
convolution oneDNN refuses goes to Paddle's own kernels (native_kernels.py asks `preferred`). MAML_ONEDNN=0
turns this module off.

Thread safety: each primitive gets its scratch memory from the caller (oneDNN's "user" scratchpad mode),
and each OS thread has its own oneDNN stream, so the two halves of a split convolution (cpu_schedule.py)
can run the same primitive at once. oneDNN uses OpenMP threads: `omp_threads` sets how many for a call.
"""
import contextlib
import ctypes
import os
import threading
import warnings

import paddle
from paddle import _C_ops

# oneDNN C API constants (dnnl_types.h, oneDNN 3.x).
_CPU_ENGINE = 1
_F32 = 3
_TAG_ANY, _TAG_A, _TAG_ABCD, _TAG_ABCDE = 1, 2, 5, 6
# Channel-blocked activation layouts, by block size: nChw16c (AVX-512 code) and nChw8c (AVX2). A tensor in
# one is held by Paddle as [N, C / block, H, W, block] (see "channel-blocked tensors" below).
_TAG_BLOCKED = {16: 78, 8: 102}
_FORWARD_TRAINING = 64
_CONVOLUTION_DIRECT = 1
_SCRATCHPAD_USER = 1
_QUERY_IMPL_INFO, _QUERY_SCRATCHPAD_MD, _QUERY_EXEC_ARG_MD = 8, 136, 255
_ARG_FROM, _ARG_TO = 1, 17
_ARG_SRC, _ARG_DST, _ARG_WEIGHTS, _ARG_SCRATCHPAD = 1, 17, 33, 80
_ARG_DIFF_SRC, _ARG_DIFF_DST, _ARG_DIFF_WEIGHTS = 129, 145, 161
_OUTPUTS = (_ARG_DST, _ARG_DIFF_SRC, _ARG_DIFF_WEIGHTS)  # reordered out of oneDNN's layout after a call
_STREAM_IN_ORDER = 1

_Dims = ctypes.c_int64 * 12
_ptr = ctypes.c_void_p


class _ExecArg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", _ptr)]


class OneDNNError(RuntimeError):
    pass


def _load():
    """(libdnnl, libiomp5) from Paddle's own libs folder, or None when this Paddle has no oneDNN."""
    if os.environ.get("MAML_ONEDNN", "1") == "0":
        return None
    libs = os.path.join(os.path.dirname(paddle.__file__), "libs")
    try:
        dnnl = ctypes.CDLL(os.path.join(libs, "libdnnl.so.3"))
        omp = ctypes.CDLL(os.path.join(libs, "libiomp5.so"))
    except OSError:
        return None
    signatures = {
        "dnnl_engine_create": [ctypes.POINTER(_ptr), ctypes.c_int, ctypes.c_size_t],
        "dnnl_stream_create": [ctypes.POINTER(_ptr), _ptr, ctypes.c_uint],
        "dnnl_memory_desc_create_with_tag": [ctypes.POINTER(_ptr), ctypes.c_int, _Dims, ctypes.c_int,
                                             ctypes.c_int],
        "dnnl_memory_desc_create_with_strides": [ctypes.POINTER(_ptr), ctypes.c_int, _Dims, ctypes.c_int, _Dims],
        "dnnl_memory_desc_create_submemory": [ctypes.POINTER(_ptr), _ptr, _Dims, _Dims],
        "dnnl_batch_normalization_forward_primitive_desc_create": [
            ctypes.POINTER(_ptr), _ptr, ctypes.c_int, _ptr, _ptr, ctypes.c_float, ctypes.c_uint, _ptr],
        "dnnl_batch_normalization_backward_primitive_desc_create": [
            ctypes.POINTER(_ptr), _ptr, ctypes.c_int, _ptr, _ptr, _ptr, ctypes.c_float, ctypes.c_uint, _ptr, _ptr],
        "dnnl_pooling_forward_primitive_desc_create": [
            ctypes.POINTER(_ptr), _ptr, ctypes.c_int, ctypes.c_int, _ptr, _ptr, _Dims, _Dims, _Dims, _Dims, _Dims,
            _ptr],
        "dnnl_pooling_backward_primitive_desc_create": [
            ctypes.POINTER(_ptr), _ptr, ctypes.c_int, _ptr, _ptr, _Dims, _Dims, _Dims, _Dims, _Dims, _ptr, _ptr],
        "dnnl_primitive_attr_create": [ctypes.POINTER(_ptr)],
        "dnnl_primitive_attr_set_scratchpad_mode": [_ptr, ctypes.c_int],
        "dnnl_convolution_forward_primitive_desc_create": [
            ctypes.POINTER(_ptr), _ptr, ctypes.c_int, ctypes.c_int, _ptr, _ptr, _ptr, _ptr,
            _Dims, _Dims, _Dims, _Dims, _ptr],
        "dnnl_convolution_backward_data_primitive_desc_create": [
            ctypes.POINTER(_ptr), _ptr, ctypes.c_int, _ptr, _ptr, _ptr, _Dims, _Dims, _Dims, _Dims, _ptr, _ptr],
        "dnnl_convolution_backward_weights_primitive_desc_create": [
            ctypes.POINTER(_ptr), _ptr, ctypes.c_int, _ptr, _ptr, _ptr, _ptr, _Dims, _Dims, _Dims, _Dims,
            _ptr, _ptr],
        "dnnl_primitive_desc_query": [_ptr, ctypes.c_int, ctypes.c_int, _ptr],
        "dnnl_primitive_desc_query_md": [_ptr, ctypes.c_int, ctypes.c_int],
        "dnnl_primitive_desc_destroy": [_ptr],
        "dnnl_memory_desc_get_size": [_ptr],
        "dnnl_primitive_create": [ctypes.POINTER(_ptr), _ptr],
        "dnnl_reorder_primitive_desc_create": [ctypes.POINTER(_ptr), _ptr, _ptr, _ptr, _ptr, _ptr],
        "dnnl_memory_desc_equal": [_ptr, _ptr],
        "dnnl_memory_create": [ctypes.POINTER(_ptr), _ptr, _ptr, _ptr],
        "dnnl_memory_destroy": [_ptr],
        "dnnl_primitive_execute": [_ptr, _ptr, ctypes.c_int, ctypes.POINTER(_ExecArg)],
        "dnnl_stream_wait": [_ptr],
        "dnnl_primitive_attr_destroy": [_ptr],
        "dnnl_post_ops_create": [ctypes.POINTER(_ptr)],
        "dnnl_post_ops_append_sum": [_ptr, ctypes.c_float, ctypes.c_int32, ctypes.c_int],
        "dnnl_post_ops_destroy": [_ptr],
        "dnnl_primitive_attr_set_post_ops": [_ptr, _ptr],
        "dnnl_binary_primitive_desc_create": [ctypes.POINTER(_ptr), _ptr, ctypes.c_int, _ptr, _ptr, _ptr, _ptr],
        "dnnl_post_ops_append_eltwise": [_ptr, ctypes.c_int, ctypes.c_float, ctypes.c_float],
        "dnnl_eltwise_forward_primitive_desc_create": [
            ctypes.POINTER(_ptr), _ptr, ctypes.c_int, ctypes.c_int, _ptr, _ptr, ctypes.c_float, ctypes.c_float, _ptr],
        "dnnl_eltwise_backward_primitive_desc_create": [
            ctypes.POINTER(_ptr), _ptr, ctypes.c_int, _ptr, _ptr, _ptr, ctypes.c_float, ctypes.c_float, _ptr, _ptr],
    }
    try:
        for name, argtypes in signatures.items():
            getattr(dnnl, name).argtypes = argtypes
        dnnl.dnnl_primitive_desc_query_md.restype = _ptr
        dnnl.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
        omp.omp_get_max_threads.restype = ctypes.c_int
        omp.omp_set_num_threads.argtypes = [ctypes.c_int]
    except AttributeError:
        return None
    return dnnl, omp


_libs = _load()
_lock = threading.Lock()
_engine = None
_attr = None
_thread_state = threading.local()
# (input shape, weight shape, ConvSettings, channels of the tensors x, y and dx are channel slices of) ->
# _create_convolution_primitives(...), or None
_primitives = {}


def _check(status, what):
    if status != 0:
        raise OneDNNError(f"oneDNN {what} failed (status {status})")


def _dims(values):
    dims = _Dims()
    for i, v in enumerate(values):
        dims[i] = v
    return dims


def _setup():
    """The CPU engine and the primitive attributes, created once."""
    global _engine, _attr
    if _engine is None:
        dnnl = _libs[0]
        engine, attr = _ptr(), _ptr()
        _check(dnnl.dnnl_engine_create(ctypes.byref(engine), _CPU_ENGINE, 0), "engine")
        _check(dnnl.dnnl_primitive_attr_create(ctypes.byref(attr)), "attributes")
        _check(dnnl.dnnl_primitive_attr_set_scratchpad_mode(attr, _SCRATCHPAD_USER), "scratchpad mode")
        _engine, _attr = engine, attr
    return _engine


def _stream():
    stream = getattr(_thread_state, "stream", None)
    if stream is None:
        stream = _ptr()
        _check(_libs[0].dnnl_stream_create(ctypes.byref(stream), _setup(), _STREAM_IN_ORDER), "stream")
        _thread_state.stream = stream
    return stream


def _descriptor(shape, tag):
    md = _ptr()
    _check(_libs[0].dnnl_memory_desc_create_with_tag(ctypes.byref(md), len(shape), _dims(shape), _F32, tag),
           "memory descriptor")
    return md


def _activation_descriptor(shape, channels, block=0):
    """Memory of the logical NCHW `shape` that is the channel slice of a tensor with `channels` channels: the two
    halves of a task-group split (cpu_schedule) are read and written in place, with no copy or concat. Plain
    NCHW with block 0, else channel-blocked (nChw<block>c), as `blocked` tensors hold it."""
    n, c, h, w = shape
    md = _ptr()
    if not block:
        _check(_libs[0].dnnl_memory_desc_create_with_strides(ctypes.byref(md), 4, _dims(shape), _F32,
                                                             _dims([channels * h * w, h * w, w, 1])),
               "memory descriptor")
    elif channels == c:
        md = _descriptor(shape, _TAG_BLOCKED[block])
    else:  # the first c channels of the parent's layout; the caller's pointer is already at the slice
        parent = _descriptor([n, channels, h, w], _TAG_BLOCKED[block])
        _check(_libs[0].dnnl_memory_desc_create_submemory(ctypes.byref(md), parent, _dims(shape), _dims([0] * 4)),
               "memory descriptor")
    return md


# ------------------------------------------------------------------------------- channel-blocked tensors
# oneDNN's fast CPU code keeps activations with their channels in blocks of 8 (AVX2) or 16 (AVX-512)
# floats: nChw<b>c. Paddle holds such a tensor as a plain [N, C / b, H, W, b] tensor (elementwise ops and
# gradient sums work on it as on any tensor); its logical shape is [N, C, H, W]. Keeping the activations in
# this layout from one layer to the next spares the layout copies in and out of every convolution, and lets
# oneDNN's batch norm and pooling run on them (onednn_layers.py), several times faster than Paddle's NCHW kernels.
def block_of(t):
    """The channel block of a blocked tensor; 0 for a plain NCHW one."""
    return t.shape[4] if len(t.shape) == 5 else 0


def logical_shape(t):
    """[N, C, H, W] of a plain or blocked tensor."""
    if len(t.shape) == 5:
        n, cb, h, w, b = t.shape
        return [n, cb * b, h, w]
    return list(t.shape)


def tensor_shape(shape, block):
    """The shape of the Paddle tensor holding logical NCHW `shape` with channel block `block` (0: plain)."""
    if not block:
        return list(shape)
    n, c, h, w = shape
    return [n, c // block, h, w, block]


def channel_slice_of(t):
    """The channel count of the contiguous tensor (plain or blocked) that `t` is a channel slice of (its own
    channel count when contiguous), or None when t is laid out otherwise."""
    if len(t.shape) == 5:
        n, cb, h, w, b = t.shape
        s0, s1, s2, s3, s4 = t.strides
        plane = h * w * b
        if (s1, s2, s3, s4) != (plane, w * b, b, 1) or s0 % plane or s0 // plane < cb:
            return None
        return (s0 // plane if n > 1 else cb) * b
    n, c, h, w = t.shape
    s0, s1, s2, s3 = t.strides
    if (s1, s2, s3) != (h * w, w, 1) or s0 % (h * w) or s0 // (h * w) < c:
        return None
    return s0 // (h * w) if n > 1 else c


_CPU = paddle.CPUPlace()


@contextlib.contextmanager
def openmp_threads(count):
    """OpenMP's thread count for the calling thread set to `count` inside the block, restored after it."""
    omp = _libs[1]
    previous = omp.omp_get_max_threads()
    omp.omp_set_num_threads(count)
    try:
        yield
    finally:
        omp.omp_set_num_threads(previous)


def empty(shape, dtype=paddle.float32):
    """An uninitialised CPU tensor: Paddle's kernel without paddle.empty's Python argument handling, which costs
    more than the kernel itself (a second-order meta-iteration makes about 11,000 of them)."""
    return _C_ops.empty(list(shape), dtype, _CPU)


class _Primitive:
    """One oneDNN primitive. Its arguments are plain NCHW / (G)OIHW tensors; where oneDNN chose a blocked
    layout for an argument (its fast AVX2/AVX-512 code wants channels in blocks of 8 or 16), the argument is
    reordered into a scratch buffer before the call (inputs) or out of it after (outputs)."""

    def __init__(self, create, plain):
        dnnl = _libs[0]
        pd = _ptr()
        _check(create(ctypes.byref(pd)), "primitive descriptor")
        self.pd = pd
        self.handle = _ptr()
        _check(dnnl.dnnl_primitive_create(ctypes.byref(self.handle), pd), "primitive")
        self.scratch_md = _ptr(dnnl.dnnl_primitive_desc_query_md(pd, _QUERY_SCRATCHPAD_MD, 0))
        self.scratch_bytes = dnnl.dnnl_memory_desc_get_size(self.scratch_md) if self.scratch_md else 0
        self.plain = plain  # {argument: plain memory descriptor}
        self.chosen = {}  # {argument: (oneDNN's descriptor, its bytes, the reorder)} where they differ
        for arg, md in plain.items():
            chosen = _ptr(dnnl.dnnl_primitive_desc_query_md(pd, _QUERY_EXEC_ARG_MD, arg))
            if not dnnl.dnnl_memory_desc_equal(chosen, md):
                source, target = (chosen, md) if arg in _OUTPUTS else (md, chosen)
                self.chosen[arg] = (chosen, dnnl.dnnl_memory_desc_get_size(chosen), _reorder(source, target))

    def implementation(self):
        info = ctypes.c_char_p()
        _libs[0].dnnl_primitive_desc_query(self.pd, _QUERY_IMPL_INFO, 0, ctypes.byref(info))
        return info.value.decode()

    def run(self, tensors, omp_threads):
        """Execute on {argument: contiguous float32 CPU tensor}; inputs reordered in, outputs out."""
        with openmp_threads(omp_threads):
            args, after = {}, []
            for arg, tensor in tensors.items():
                if arg not in self.chosen:
                    args[arg] = (self.plain[arg], tensor)
                    continue
                md, size, reorder = self.chosen[arg]
                buffer = empty([size], paddle.uint8)
                args[arg] = (md, buffer)
                if arg in _OUTPUTS:
                    after.append((reorder, buffer, tensor))
                else:
                    reorder.execute({_ARG_FROM: (reorder.source, tensor), _ARG_TO: (reorder.target, buffer)})
            self.execute(args)
            for reorder, buffer, tensor in after:
                reorder.execute({_ARG_FROM: (reorder.source, buffer), _ARG_TO: (reorder.target, tensor)})

    def execute(self, args):
        """Run on {argument: (memory descriptor, tensor)}, with this call's own scratch memory."""
        dnnl = _libs[0]
        engine = _setup()
        scratch = None
        pairs = [(arg, md, t.data_ptr()) for arg, (md, t) in args.items()]
        if self.scratch_bytes:
            scratch = empty([self.scratch_bytes], paddle.uint8)
            pairs.append((_ARG_SCRATCHPAD, self.scratch_md, scratch.data_ptr()))
        memories = []
        try:
            for arg, md, address in pairs:
                memory = _ptr()
                _check(dnnl.dnnl_memory_create(ctypes.byref(memory), md, engine, _ptr(address)), "memory")
                memories.append((arg, memory))
            exec_args = (_ExecArg * len(memories))(*[_ExecArg(arg, memory) for arg, memory in memories])
            stream = _stream()
            _check(dnnl.dnnl_primitive_execute(self.handle, stream, len(memories), exec_args), "execute")
            _check(dnnl.dnnl_stream_wait(stream), "stream wait")
        finally:
            for _, memory in memories:
                dnnl.dnnl_memory_destroy(memory)
        del scratch  # kept alive until oneDNN is done with it


def _reorder(source, target):
    """A primitive copying memory of descriptor `source` into the layout of `target`."""
    dnnl, engine = _libs[0], _setup()
    reorder = _Primitive(
        lambda pd: dnnl.dnnl_reorder_primitive_desc_create(pd, source, engine, target, engine, _attr), {})
    reorder.source, reorder.target = source, target
    return reorder


def _convolution_primitives(x_shape, w_shape, conv, x_channels=None, y_channels=None, dx_channels=None, x_block=0):
    """(forward, backward-data, backward-weights) primitives for this shape and ConvSettings, cached. The input,
    the output (and its gradient) and the input's gradient are channel slices of tensors of x_channels,
    y_channels and dx_channels channels (None: contiguous). The input and its gradient have the channel block
    x_block, the output and its gradient conv.block (0: plain NCHW)."""
    x_channels = x_channels or x_shape[1]
    y_channels = y_channels or w_shape[0]
    dx_channels = dx_channels or x_shape[1]
    key = (tuple(x_shape), tuple(w_shape), tuple(conv), x_channels, y_channels, dx_channels, x_block)
    found = _primitives.get(key)
    if found is not None:
        return found
    with _lock:
        if key in _primitives:
            return _primitives[key]
        try:
            found = _primitives[key] = _create_convolution_primitives(x_shape, w_shape, conv, *key[3:])
        except OneDNNError as exc:  # this convolution stays with Paddle's kernel (preferred)
            warnings.warn(f"oneDNN refused a convolution of {list(x_shape)} by {list(w_shape)} ({exc}); "
                          "Paddle's kernel computes it")
            found = _primitives[key] = None
        return found


def _create_convolution_primitives(x_shape, w_shape, conv, x_channels, y_channels, dx_channels, x_block):
    """(forward, backward-data, backward-weights primitives); OneDNNError if refused."""
    n, c, h, w = x_shape
    out_c, in_per_group, kh, kw = w_shape
    g = conv.groups
    _, _, oh, ow = output_shape(x_shape, w_shape, conv)
    src = _activation_descriptor([n, c, h, w], x_channels, x_block)
    dst = _activation_descriptor([n, out_c, oh, ow], y_channels, conv.block)
    diff_src = _activation_descriptor([n, c, h, w], dx_channels, x_block)
    w_shape = [g, out_c // g, in_per_group, kh, kw] if g > 1 else [out_c, in_per_group, kh, kw]
    weights = _descriptor(w_shape, _TAG_ABCDE if g > 1 else _TAG_ABCD)
    # oneDNN picks the layouts of its fastest code for "any"; _Primitive reorders to and from NCHW. Blocked
    # activations are given as they are, so that no copy is made; where oneDNN refuses them (a channel
    # slice), it picks, and _Primitive copies.
    src_any, dst_any = _descriptor([n, c, h, w], _TAG_ANY), _descriptor([n, out_c, oh, ow], _TAG_ANY)
    weights_any = _descriptor(w_shape, _TAG_ANY)
    if x_block or conv.block:
        try:
            exact = _convolution_triple(src, dst, diff_src, weights, weights_any, conv,
                                        src if x_block else src_any, dst if conv.block else dst_any,
                                        diff_src if x_block else src_any)
            # A channel slice of a blocked tensor gets only oneDNN's reference code (measured many times slower);
            # its fast code on a copy is then the better deal.
            if not any(p.implementation().startswith("ref") for p in exact):
                return exact
        except OneDNNError:
            pass
    return _convolution_triple(src, dst, diff_src, weights, weights_any, conv, src_any, dst_any, src_any)


def _convolution_triple(src, dst, diff_src, weights, weights_any, conv, src_pd, dst_pd, diff_src_pd):
    dnnl, engine = _libs[0], _setup()
    strides, dilations = _dims([conv.stride] * 2), _dims([0, 0])  # oneDNN: dilation 0 = none
    pad = _dims([conv.padding] * 2)
    forward = _Primitive(
        lambda pd: dnnl.dnnl_convolution_forward_primitive_desc_create(
            pd, engine, _FORWARD_TRAINING, _CONVOLUTION_DIRECT, src_pd, weights_any, None, dst_pd,
            strides, dilations, pad, pad, _attr),
        {_ARG_SRC: src, _ARG_WEIGHTS: weights, _ARG_DST: dst})
    backward_data = _Primitive(
        lambda pd: dnnl.dnnl_convolution_backward_data_primitive_desc_create(
            pd, engine, _CONVOLUTION_DIRECT, diff_src_pd, weights_any, dst_pd, strides, dilations, pad, pad,
            forward.pd, _attr),
        {_ARG_DIFF_SRC: diff_src, _ARG_WEIGHTS: weights, _ARG_DIFF_DST: dst})
    backward_weights = _Primitive(
        lambda pd: dnnl.dnnl_convolution_backward_weights_primitive_desc_create(
            pd, engine, _CONVOLUTION_DIRECT, src_pd, weights_any, None, dst_pd, strides, dilations,
            pad, pad, forward.pd, _attr),
        {_ARG_SRC: src, _ARG_DIFF_WEIGHTS: weights, _ARG_DIFF_DST: dst})
    return forward, backward_data, backward_weights


def output_shape(x_shape, w_shape, conv):
    """The logical NCHW shape of conv(x, weight) for ConvSettings `conv`."""
    n, _, h, w = x_shape
    out_c, _, kh, kw = w_shape
    return [n, out_c, (h + 2 * conv.padding - kh) // conv.stride + 1, (w + 2 * conv.padding - kw) // conv.stride + 1]


def output_tensor_shape(x, weight, conv):
    """The shape of the tensor conv2d returns for x (plain or blocked): blocked by conv.block."""
    return tensor_shape(output_shape(logical_shape(x), weight.shape, conv), conv.block)


def supports(x, weight):
    """Whether this module can compute convolutions of x with weight (float32 tensors on the CPU)."""
    return (_libs is not None and x.dtype == paddle.float32 and weight.dtype == paddle.float32
            and x.place.is_cpu_place() and len(x.shape) in (4, 5))


# Where oneDNN's blocked-layout code pays for its two layout copies (doc/performance.md): from 8 input channels
# per group, at every size the model has. With one input channel per group (the first layer) Paddle's forward
# is faster and the gradients tie, so the first layer stays with Paddle, unless its output is to be blocked
# (then there is no copy out to pay for, and only oneDNN can write that layout).
_MIN_CHANNELS_PER_GROUP = 8


def preferred(x, weight, conv):
    """Whether a convolution of x with weight (ConvSettings conv) should run here rather than in Paddle's kernel.
    Always, for a blocked input or output: Paddle's kernels know no such layout."""
    blocked = len(x.shape) == 5 or conv.block
    return (supports(x, weight) and (blocked or weight.shape[1] >= _MIN_CHANNELS_PER_GROUP)
            and _convolution_primitives(logical_shape(x), weight.shape, conv, x_block=block_of(x)) is not None)


def _sliced(t):
    """(t, the channel count of the tensor it is a channel slice of), copying t when it is laid out otherwise."""
    channels = channel_slice_of(t)
    if channels is None:
        t = t.contiguous()
        channels = logical_shape(t)[1]
    return t, channels


def _output(out, shape, like):
    """`out` (a channel slice the caller gives, of tensor shape `shape`) or a new tensor; with its channel count."""
    if out is None:
        return empty(shape, like.dtype), _channels(shape)
    channels = channel_slice_of(out)
    if list(out.shape) != list(shape) or channels is None:
        raise ValueError(f"out must be a channel slice of a tensor of shape {list(shape)}")
    return out, channels


def _channels(shape):
    return shape[1] * shape[4] if len(shape) == 5 else shape[1]


def conv2d(x, weight, conv, omp_threads=1, out=None):
    """conv(x, weight), no bias, with ConvSettings `conv`: x plain NCHW or blocked, the result blocked by
    conv.block. x may be a channel slice of a larger tensor; `out`, if given, is written (it may be one too)
    and returned."""
    (x, x_channels), weight = _sliced(x), weight.contiguous()
    out, y_channels = _output(out, output_tensor_shape(x, weight, conv), x)
    forward = _convolution_primitives(logical_shape(x), weight.shape, conv, x_channels, y_channels,
                                      x_block=block_of(x))[0]
    forward.run({_ARG_SRC: x, _ARG_WEIGHTS: weight, _ARG_DST: out}, omp_threads)
    return out


def conv2d_grad(x, weight, out_grad, conv, omp_threads=1, dx=None, dw=None):
    """(d/dx, d/dweight) of sum(out_grad * conv(x, weight)); dx in x's layout. x and out_grad may be channel
    slices of larger tensors, and the caller may give dx (a channel slice too) and dw (contiguous) to write into."""
    (x, x_channels), (out_grad, y_channels), weight = _sliced(x), _sliced(out_grad), weight.contiguous()
    dx, dx_channels = _output(dx, x.shape, x)
    if dw is None:
        dw = empty(weight.shape, weight.dtype)
    elif list(dw.shape) != list(weight.shape) or not dw.is_contiguous():
        raise ValueError(f"dw must be a contiguous tensor of shape {list(weight.shape)}")
    _, backward_data, backward_weights = _convolution_primitives(logical_shape(x), weight.shape, conv, x_channels,
                                                                    y_channels, dx_channels, block_of(x))
    backward_data.run({_ARG_DIFF_SRC: dx, _ARG_WEIGHTS: weight, _ARG_DIFF_DST: out_grad}, omp_threads)
    backward_weights.run({_ARG_SRC: x, _ARG_DIFF_WEIGHTS: dw, _ARG_DIFF_DST: out_grad}, omp_threads)
    return dx, dw


def implementations(x_shape, w_shape, conv, x_block=0):
    """oneDNN's names of the code it chose for this convolution (forward, backward data, backward weights)."""
    return tuple(p.implementation() for p in _convolution_primitives(x_shape, w_shape, conv, x_block=x_block))


def activation_block(x_shape, w_shape, conv):
    """The channel block (16 or 8) of the layout oneDNN's convolution code wants for its output at this shape,
    or 0 when that is no blocked layout this module can hold (then activations stay plain NCHW)."""
    if _libs is None:
        return 0
    key = ("block", tuple(x_shape), tuple(w_shape), tuple(conv))
    if key not in _primitives:
        with _lock:
            _primitives[key] = _chosen_block(x_shape, w_shape, conv)
    return _primitives[key]


def _chosen_block(x_shape, w_shape, conv):
    dnnl, engine = _libs[0], _setup()
    out = output_shape(x_shape, w_shape, conv)
    g = conv.groups
    out_c, in_per_group, kh, kw = w_shape
    w_dims = [g, out_c // g, in_per_group, kh, kw] if g > 1 else list(w_shape)
    pd = _ptr()
    strides, dilations, pad = _dims([conv.stride] * 2), _dims([0, 0]), _dims([conv.padding] * 2)
    status = dnnl.dnnl_convolution_forward_primitive_desc_create(
        ctypes.byref(pd), engine, _FORWARD_TRAINING, _CONVOLUTION_DIRECT, _descriptor(x_shape, _TAG_ANY),
        _descriptor(w_dims, _TAG_ANY), None, _descriptor(out, _TAG_ANY), strides, dilations, pad, pad, _attr)
    if status != 0:
        return 0
    try:
        chosen = _ptr(dnnl.dnnl_primitive_desc_query_md(pd, _QUERY_EXEC_ARG_MD, _ARG_DST))
        for block, tag in _TAG_BLOCKED.items():
            if out[1] % block == 0 and dnnl.dnnl_memory_desc_equal(chosen, _descriptor(out, tag)):
                return block
        return 0
    finally:
        dnnl.dnnl_primitive_desc_destroy(pd)

"""Paddle's native kernels under the double-differentiable ops, one named wrapper per kernel.

Paddle's `_C_ops` functions take every attribute positionally, in the order of Paddle's op definitions
(paddle/phi/ops/yaml/ops.yaml and backward.yaml, paddle 3.x), and a wrong boolean in such a list silently
computes something else. This module is the only place that spells those lists; each attribute is named
in a comment. Convolutions go to oneDNN (onednn_conv.py) where that is faster. Layout is NCHW. Nothing here
is differentiable: the callers pass detached tensors or call from inside a PyLayer (double_grad_ops.py).
"""
from collections import namedtuple

from paddle import _C_ops

from . import onednn_conv
from .onednn_conv import output_tensor_shape as conv2d_output_tensor_shape  # noqa: F401  (cpu_schedule's)

# One convolution's settings: square stride and padding, `groups` (the tasks stacked on the channel axis,
# see net.py), and the channel block of its output (0: plain NCHW; see onednn_conv's blocked tensors). No
# dilation, no bias.
ConvSettings = namedtuple("ConvSettings", "stride padding groups block", defaults=(0,))


def _conv_attributes(conv):
    return ([conv.stride] * 2,   # strides
            [conv.padding] * 2,  # paddings
            "EXPLICIT",          # padding_algorithm: the paddings as given
            [1, 1],              # dilations
            conv.groups,         # groups
            "NCHW")              # data_format


def conv2d(x, weight, conv, out=None):
    """conv(x, weight) with the settings `conv` (a ConvSettings): oneDNN's kernel on one thread where it is
    the faster (float32 on a CPU, large enough; onednn_conv.preferred), else Paddle's. `out`: a tensor (or
    channel slice) oneDNN writes the result into; only for calls it computes (writes_in_place)."""
    if onednn_conv.preferred(x, weight, conv):
        return onednn_conv.conv2d(x, weight, conv, out=out)
    assert out is None, "only oneDNN's convolutions write into a given tensor"
    return _C_ops.conv2d(x, weight, *_conv_attributes(conv))


def conv2d_grad(x, weight, out_grad, conv, dx=None, dw=None):
    """(d/dx, d/dweight) of sum(out_grad * conv(x, weight)), from the kernel conv2d would choose; dx and dw as
    conv2d's `out`."""
    if onednn_conv.preferred(x, weight, conv):
        return onednn_conv.conv2d_grad(x, weight, out_grad, conv, dx=dx, dw=dw)
    assert dx is None and dw is None, "only oneDNN's convolutions write into given tensors"
    return _C_ops.conv2d_grad(x, weight, out_grad, *_conv_attributes(conv))


def conv2d_weight_grad_of_blocked(x, out_grad, conv, weight_shape):
    """d/dweight of sum(out_grad * conv(x, weight)) for a plain NCHW x and a channel-blocked out_grad (each
    group's output channels whole blocks): per task group, the unfolded input (im2col) times the output
    gradient, read in its blocked layout as it is. Paddle's conv2d_grad would need out_grad in NCHW first (a
    layout copy) and computes d/dx too, which an input taking no gradient (the images) does not need."""
    n, _, h, w = x.shape
    out_channels, per_group, kh, kw = weight_shape
    groups, block = conv.groups, out_grad.shape[4]
    positions = out_grad.shape[2] * out_grad.shape[3]
    patches = _C_ops.unfold(x.reshape([n * groups, per_group, h, w]), [kh, kw],  # kernel_sizes
                            [conv.stride] * 2,                                   # strides
                            [conv.padding] * 4,                                  # paddings: top, left, bottom, right
                            [1, 1])                                              # dilations
    patches = patches.reshape([n, groups, 1, per_group * kh * kw, positions])
    blocks = out_grad.reshape([n, groups, out_channels // groups // block, positions, block])
    grad = _C_ops.matmul(patches, blocks, False, False).sum(axis=0)  # [groups, blocks per group, J, block]
    return grad.transpose([0, 1, 3, 2]).reshape(list(weight_shape))


def writes_in_place(x, weight, conv):
    """Whether conv2d / conv2d_grad of x with weight can write into tensors the caller gives."""
    return onednn_conv.preferred(x, weight, conv)


# Momentum of the running statistics. The training kernel updates the running buffers it is given in place;
# this model never reads them (batch statistics at train and test time), so the value does not matter.
_MOMENTUM = 0.9


def batch_norm_training(x, scale, bias, running_mean, running_var, *, epsilon):
    """(scale * x_hat + bias, batch mean, 1 / sqrt(batch variance + epsilon)) per channel, x_hat normalised by
    x's own batch statistics. running_mean / running_var are scratch buffers the kernel overwrites."""
    out, _, _, mean, inv_std, _ = _C_ops.batch_norm(
        x, running_mean, running_var, scale, bias,
        False,  # is_test: no, normalise with the batch's statistics
        _MOMENTUM,
        epsilon,
        "NCHW",  # data_format
        False,  # use_global_stats: no
        False,  # trainable_statistics: no
    )
    return out, mean, inv_std


def batch_norm_given_statistics(x, scale, bias, mean, variance, *, epsilon):
    """scale * (x - mean) / sqrt(variance + epsilon) + bias with the per-channel mean and variance given: the
    kernel skips its statistics pass."""
    return _C_ops.batch_norm(
        x, mean, variance, scale, bias,
        True,  # is_test: yes, use the statistics given
        _MOMENTUM,
        epsilon,
        "NCHW",  # data_format
        True,  # use_global_stats: yes, the given ones rather than the batch's
        False,  # trainable_statistics: no
    )[0]


def batch_norm_grad(x, scale, bias, mean, inv_std, out_grad, *, epsilon):
    """Training-mode batch-norm backward with the batch statistics `mean` and `inv_std` (1 / std, what
    batch_norm_training returns): (dx, dscale, dbias) =
    (scale * inv_std * (g - <g> - x_hat <g x_hat>), sum(g x_hat), sum(g)) per channel, for g = out_grad."""
    return _C_ops.batch_norm_grad(
        x, scale, bias,
        mean, inv_std,  # mean_out, variance_out: the running statistics, read only with use_global_stats
        mean, inv_std,  # saved_mean, saved_variance (Paddle saves 1 / std under that name)
        None,  # reserve_space: cuDNN's, none on CPU
        out_grad,
        _MOMENTUM,
        epsilon,
        "NCHW",  # data_format
        False,  # is_test: no
        False,  # use_global_stats: no
        False,  # trainable_statistics: no
    )


# 2x2 windows, stride 2, no padding.
_POOL_WINDOW = ([2, 2],  # kernel_size
                [2, 2],  # strides
                [0, 0])  # paddings
_POOL_MODE = (False,  # global_pooling: no
              False,  # adaptive: no
              False)  # ceil_mode: no, floor (a trailing odd row or column is dropped, as in F.max_pool2d)


def max_pool2x2_with_index(x):
    """(2x2 max-pool of x, the argmax of every window as a flat int32 index into its H x W plane)."""
    return _C_ops.max_pool2d_with_index(x, *_POOL_WINDOW, *_POOL_MODE)


def max_pool2x2_with_index_grad(x, mask, out_grad):
    """out_grad scattered back to the argmax positions `mask`, zeros elsewhere (x gives the shape)."""
    return _C_ops.max_pool2d_with_index_grad(x, mask, out_grad, *_POOL_WINDOW, *_POOL_MODE)

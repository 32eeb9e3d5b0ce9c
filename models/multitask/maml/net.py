"""The 4-block CNN of the MAML paper (Finn et al., 2017) as a pure function of its parameters.

`MAMLNet` only holds the meta-parameters (the initialisation MAML learns). The computation is
`task_logits(params, x)`, which runs T tasks at once, each with its own copy of the parameters: tasks are
stacked on the channel axis, so every convolution is one grouped native convolution (groups = T) and every
batch norm computes per-task statistics in one native call. Adapted parameters are plain tensors in that
task-stacked layout, never copies of layers.
"""
import math

import paddle
import paddle.nn as nn

import double_grad_ops as ops


class MAMLNet(nn.Layer):
    """Meta-parameters, in this order: for each block conv weight, bn gamma, bn beta; then fc weight, bias.

    The conv layers have no bias: batch norm subtracts the per-channel mean right after, so a conv bias
    would have no effect and an exactly zero gradient.
    """

    def __init__(self, n_way, channels=64, blocks=4, kernel=3, stride=1, padding=1, imgsize=28, in_channels=1):
        super().__init__()
        self.n_way, self.blocks = n_way, blocks
        self.stride, self.padding = stride, padding
        self.feature_size = feature_size(imgsize, blocks, kernel, stride, padding)
        dtype = paddle.get_default_dtype()
        cin = in_channels
        for b in range(blocks):
            fan_in = cin * kernel * kernel
            self._add(f"conv{b}_weight", [channels, cin, kernel, kernel], dtype,
                      nn.initializer.Normal(0.0, math.sqrt(2.0 / fan_in)))
            self._add(f"bn{b}_weight", [channels], dtype, nn.initializer.Constant(1.0))
            self._add(f"bn{b}_bias", [channels], dtype, nn.initializer.Constant(0.0))
            cin = channels
        features = channels * self.feature_size ** 2
        self._add("fc_weight", [features, n_way], dtype, nn.initializer.XavierUniform())
        self._add("fc_bias", [n_way], dtype, nn.initializer.Constant(0.0))

    def _add(self, name, shape, dtype, init):
        self.add_parameter(name, self.create_parameter(shape, dtype=dtype, default_initializer=init))

    def forward(self, x):
        """Plain network on images [N, C, H, W] with the meta-parameters: logits [N, n_way]."""
        params = expand_to_tasks(self.parameters(), 1)
        return task_logits(params, x.unsqueeze(0), self.blocks, self.stride, self.padding)[0]


class ShapeError(ValueError):
    """The image is too small for the network's blocks."""


def feature_size(imgsize, blocks, kernel, stride, padding):
    size = imgsize
    for _ in range(blocks):
        size = (size + 2 * padding - kernel) // stride + 1
        size //= 2
    if size < 1:
        raise ShapeError(f"imgsize {imgsize} is too small for {blocks} conv+pool blocks")
    return size


def expand_to_tasks(params, tasks):
    """One copy of every parameter per task, in the task-stacked layout that `task_logits` takes.
    Differentiable: the gradient of a copy flows back to the shared parameter (summed over tasks)."""
    params = list(params)
    stacked = []
    for p in params[:-2]:
        repeat = [tasks] + [1] * (len(p.shape) - 1)
        stacked.append(paddle.tile(p, repeat))  # conv [T*C, Cin, k, k]; bn [T*C]
    fc_weight, fc_bias = params[-2:]
    stacked.append(paddle.tile(fc_weight.unsqueeze(0), [tasks, 1, 1]))  # [T, F, n_way]
    stacked.append(paddle.tile(fc_bias.reshape([1, 1, -1]), [tasks, 1, 1]))  # [T, 1, n_way]
    return stacked


def task_logits(params, x, blocks=4, stride=1, padding=1):
    """Logits [T, n, n_way] for images x [T, n, C, H, W], task t using its own parameters."""
    tasks, n = x.shape[0], x.shape[1]
    h = x.transpose([1, 0, 2, 3, 4]).reshape([n, tasks * x.shape[2], x.shape[3], x.shape[4]])
    for b in range(blocks):
        weight, gamma, beta = params[3 * b: 3 * b + 3]
        h = ops.conv2d(h, weight, stride=stride, padding=padding, groups=tasks)
        h = ops.batch_norm(h, gamma, beta)
        # ReLU after the pool instead of before: max commutes with a monotone function, so values and
        # gradients are the same, on a quarter of the elements.
        h = paddle.nn.functional.relu(ops.max_pool2d(h))
    features = h.reshape([n, tasks, -1]).transpose([1, 0, 2])
    fc_weight, fc_bias = params[-2:]
    return paddle.matmul(features, fc_weight) + fc_bias


def task_losses(params, x, y, blocks=4, stride=1, padding=1):
    """(mean cross-entropy per task [T], logits [T, n, n_way])."""
    logits = task_logits(params, x, blocks, stride, padding)
    return ops.cross_entropy(logits, y).mean(axis=1), logits

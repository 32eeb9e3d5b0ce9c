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
    """Meta-parameters, in this order: for each block conv weight, bn gamma, bn beta; then fc weight, bias;
    then, with learned inner rates, `inner_lr`.

    The conv layers have no bias: batch norm subtracts the per-channel mean right after, so a conv bias
    would have no effect and an exactly zero gradient.

    Two MAML++ options (Antoniou et al., 2019) change which meta-parameters exist and how the inner loop
    uses them; with both off this is the MAML paper's network:
    - `bn_stages` > 0 (per-step batch norm): every bn gamma/beta has one row per inner-loop stage
      ([bn_stages, C]); stage s (the parameters after s inner steps) normalises with row min(s, bn_stages - 1).
      These rows are learned by the outer loop only; the inner loop adapts the convs and the classifier.
    - `lr_steps` > 0 (learned inner rates): `inner_lr` [lr_steps, adapted tensors], one rate per adapted
      tensor per inner step, starting at `inner_lr_init`; steps beyond lr_steps reuse the last row.
    """

    def __init__(self, n_way, channels=64, blocks=4, kernel=3, stride=1, padding=1, imgsize=28, in_channels=1,
                 bn_stages=0, lr_steps=0, inner_lr_init=0.1):
        super().__init__()
        self.n_way, self.blocks = n_way, blocks
        self.stride, self.padding = stride, padding
        self.bn_stages = bn_stages
        self.feature_size = feature_size(imgsize, blocks, kernel, stride, padding)
        dtype = paddle.get_default_dtype()
        bn_shape = lambda c: [bn_stages, c] if bn_stages else [c]  # noqa: E731
        cin = in_channels
        for b in range(blocks):
            fan_in = cin * kernel * kernel
            self._add(f"conv{b}_weight", [channels, cin, kernel, kernel], dtype,
                      nn.initializer.Normal(0.0, math.sqrt(2.0 / fan_in)))
            self._add(f"bn{b}_weight", bn_shape(channels), dtype, nn.initializer.Constant(1.0))
            self._add(f"bn{b}_bias", bn_shape(channels), dtype, nn.initializer.Constant(0.0))
            cin = channels
        features = channels * self.feature_size ** 2
        self._add("fc_weight", [features, n_way], dtype, nn.initializer.XavierUniform())
        self._add("fc_bias", [n_way], dtype, nn.initializer.Constant(0.0))
        if lr_steps:
            self._add("inner_lr", [lr_steps, len(self.adapted_parameters())], dtype,
                      nn.initializer.Constant(inner_lr_init))
        else:
            self.inner_lr = None

    def _add(self, name, shape, dtype, init):
        self.add_parameter(name, self.create_parameter(shape, dtype=dtype, default_initializer=init))

    def _is_bn(self, name):
        return name.startswith("bn")

    def _layer_names(self):
        return [name for name, _ in self.named_parameters() if name != "inner_lr"]

    def _is_adapted(self, name):
        """Adapted by the inner loop: every layer parameter but per-step bn rows (and never the inner rates)."""
        return name != "inner_lr" and not (self.bn_stages and self._is_bn(name))

    def adapted_positions(self):
        """Where the adapted tensors sit among the network's parameters (the `layer_inputs` list)."""
        return [i for i, name in enumerate(self._layer_names()) if self._is_adapted(name)]

    def adapted_parameters(self):
        """The meta-parameters the inner loop adapts, in their registration order."""
        return [p for name, p in self.named_parameters() if self._is_adapted(name)]

    def layer_inputs(self, fast, stage):
        """The parameter list `task_logits` takes at inner-loop `stage`, from the adapted tensors `fast`
        (task-stacked, in adapted_parameters() order): with per-step batch norm, that stage's bn rows
        are put in, one copy per task."""
        if not self.bn_stages:
            return fast
        tasks = fast[-1].shape[0]  # fc bias [T, 1, n_way]
        row = min(stage, self.bn_stages - 1)
        named, fast = dict(self.named_parameters()), iter(fast)
        return [paddle.tile(named[name][row], [tasks]) if self._is_bn(name) else next(fast)
                for name in self._layer_names()]

    def inner_rates(self, step, lr):
        """Step sizes of inner `step`, one per adapted tensor: learned ones, or the fixed `lr`."""
        if self.inner_lr is None:
            return [lr] * len(self.adapted_positions())
        row = self.inner_lr[min(step, self.inner_lr.shape[0] - 1)]
        return [row[i] for i in range(row.shape[0])]

    def forward(self, x):
        """Plain network on images [N, C, H, W] with the meta-parameters (last bn stage): logits [N, n_way]."""
        fast = expand_to_tasks(self.adapted_parameters(), 1)
        inputs = self.layer_inputs(fast, self.bn_stages)
        return task_logits(inputs, x.unsqueeze(0), self.blocks, self.stride, self.padding)[0]


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
    """One copy of every parameter per task, in the task-stacked layout that `task_logits` takes
    (conv weights and bn vectors repeated on axis 0, the classifier's two given a task axis: it comes last).
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


# Added to the logit of an unused output: its softmax is then exactly 0 in float32 and float64, so it takes
# no probability and its gradient (softmax - one-hot) is exactly 0. Finite, unlike -inf, so that
# 0 * mask stays 0 in the cross-entropy.
MASKED_LOGIT = -1e9


def mask_outputs(params, classes):
    """Task-stacked parameters (expand_to_tasks) whose logits beyond the first `classes` are masked out.

    The mask goes into the classifier bias copy: every forward pass of these parameters then has it,
    and since a masked logit's gradient is exactly 0, inner SGD steps keep it as it is."""
    fc_bias = params[-1]
    mask = paddle.to_tensor([0.0] * classes + [MASKED_LOGIT] * (fc_bias.shape[-1] - classes), dtype=fc_bias.dtype)
    return list(params[:-1]) + [fc_bias + mask]


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

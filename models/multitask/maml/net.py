"""The 4-block CNN of the MAML paper (Finn et al., 2017) as a pure function of its parameters.

`MAMLNet` only holds the meta-parameters (the initialisation MAML learns). The computation is
`task_logits(params, x)`, which runs T tasks at once, each with its own copy of the parameters: tasks are
stacked on the channel axis, so every convolution is one grouped native convolution (groups = T) and every
batch norm computes per-task statistics in one native call. Adapted parameters are plain tensors in that
task-stacked layout, never copies of layers.

Batch norm has three modes (NORM_MODES), a property of the network set by hyper_parameters.norm_mode:
- "transductive" (MAML's): the images of a forward pass are normalised with their own batch statistics, so a
  query image's logits depend on the other query images classified with it;
- "support" (task normalisation from the support set, one of the candidates of Bronskill et al., "TaskNorm:
  Rethinking Batch Normalization for Meta-Learning", ICML 2020): every image, support or query, is normalised
  with the moments of its task's support images under the same parameters, so a query image's logits depend
  only on it and the support set. The support set alone is normalised exactly as in transductive mode;
- "tasknorm_i" (TaskNorm-I, from the same paper): as "support", but every image's moments are blended with its
  own instance moments (over H and W) by a learned weight per block, alpha = sigmoid(scale * support images
  + offset); the support set while adapting is normalised that way too.
"""
import math
from collections import namedtuple
from collections.abc import Mapping

import paddle
import paddle.nn as nn

import maml_kernels as ops


NORM_MODES = ("transductive", "support", "tasknorm_i")

BlockNames = namedtuple("BlockNames", "conv gamma beta")


def block_names(b):
    """Names of block b's parameters: conv weight, batch-norm gamma and beta."""
    return BlockNames(f"conv{b}_weight", f"bn{b}_weight", f"bn{b}_bias")


CLASSIFIER_NAMES = ("fc_weight", "fc_bias")


def layer_names(blocks):
    """Names of the network's layer parameters, in MAMLNet's order: each block's, then the classifier's."""
    return [name for b in range(blocks) for name in block_names(b)] + list(CLASSIFIER_NAMES)


def by_name(params, blocks=None):
    """The layer parameters as {name: tensor}, what the functions here work on. A mapping is returned as it
    is; a plain sequence in layer_names() order (model.parameters() without inner rates: what a simple loop
    or the finite-difference tests pass) is named by that order, for `blocks` blocks (by default as many as
    its length makes)."""
    if isinstance(params, Mapping):
        return params
    params = list(params)
    names = layer_names((len(params) - len(CLASSIFIER_NAMES)) // 3 if blocks is None else blocks)
    if len(names) != len(params):
        raise ValueError(f"expected the network's {len(names)} layer parameters {names}, got {len(params)} tensors")
    return dict(zip(names, params))


class MAMLNet(nn.Layer):
    """The meta-parameters (there is no `forward`: the computation is `task_logits`). Registered in this
    order, which checkpoints and the meta-gradient lists follow: for each block conv weight, bn gamma, bn beta
    (block_names); then fc weight, bias; then, with learned inner rates, `inner_lr`.

    The conv layers have no bias: batch norm subtracts the per-channel mean right after, so a conv bias
    would have no effect and an exactly zero gradient.

    Two MAML++ options (Antoniou et al., 2019) change which meta-parameters exist and how the inner loop
    uses them; with both off this is the MAML paper's network:
    - `bn_stages` > 0 (per-step batch norm): every bn gamma/beta has one row per inner-loop stage
      ([bn_stages, C]); stage s (the parameters after s inner steps) normalises with row min(s, bn_stages - 1).
      These rows are learned by the outer loop only; the inner loop adapts the convs and the classifier.
    - `lr_steps` > 0 (learned inner rates): `inner_lr` [lr_steps, adapted tensors], one rate per adapted
      tensor (column i: the i-th of adapted_names) per inner step, starting at `inner_lr_init`; steps beyond
      lr_steps reuse the last row.

    `norm` (one of NORM_MODES) says which images' statistics normalise the query images (see the module
    docstring); maml.py reads it. "tasknorm_i" adds `tasknorm` [blocks, 2] (registered after the classifier,
    before `inner_lr`): each block's (scale, offset) of its blend weight, both starting at 0 (alpha = 1/2),
    learned by the outer loop only.
    """

    def __init__(self, n_way, channels=64, blocks=4, kernel=3, stride=1, padding=1, imgsize=28, in_channels=1,
                 bn_stages=0, lr_steps=0, inner_lr_init=0.1, norm="transductive"):
        super().__init__()
        if norm not in NORM_MODES:
            raise ValueError(f"norm must be one of {NORM_MODES}, got {norm!r}")
        self.n_way, self.blocks, self.norm = n_way, blocks, norm
        self.stride, self.padding = stride, padding
        self.bn_stages = bn_stages
        self.feature_size = feature_size(imgsize, blocks, kernel, stride, padding)
        dtype = paddle.get_default_dtype()
        bn_shape = lambda c: [bn_stages, c] if bn_stages else [c]  # noqa: E731
        cin = in_channels
        for b in range(blocks):
            conv, gamma, beta = block_names(b)
            fan_in = cin * kernel * kernel
            self._add(conv, [channels, cin, kernel, kernel], dtype, nn.initializer.Normal(0.0, math.sqrt(2.0 / fan_in)))
            self._add(gamma, bn_shape(channels), dtype, nn.initializer.Constant(1.0))
            self._add(beta, bn_shape(channels), dtype, nn.initializer.Constant(0.0))
            cin = channels
        features = channels * self.feature_size ** 2
        fc_weight, fc_bias = CLASSIFIER_NAMES
        self._add(fc_weight, [features, n_way], dtype, nn.initializer.XavierUniform())
        self._add(fc_bias, [n_way], dtype, nn.initializer.Constant(0.0))
        if norm == "tasknorm_i":
            self._add("tasknorm", [blocks, 2], dtype, nn.initializer.Constant(0.0))
        else:
            self.tasknorm = None
        # Adapted by the inner loop: every layer parameter, except the per-stage bn rows with bn_stages.
        self.per_stage_names = ([name for b in range(blocks) for name in (block_names(b).gamma, block_names(b).beta)]
                                if bn_stages else [])
        self.adapted_names = [name for name in layer_names(blocks) if name not in self.per_stage_names]
        if lr_steps:
            self._add("inner_lr", [lr_steps, len(self.adapted_names)], dtype, nn.initializer.Constant(inner_lr_init))
        else:
            self.inner_lr = None

    def _add(self, name, shape, dtype, init):
        self.add_parameter(name, self.create_parameter(shape, dtype=dtype, default_initializer=init))

    def adapted_parameters(self):
        """{name: meta-parameter} of the tensors the inner loop adapts, in registration order."""
        return {name: getattr(self, name) for name in self.adapted_names}

    def layer_inputs(self, fast, stage):
        """{name: tensor} of every layer parameter, what `task_logits` takes at inner-loop `stage`, from the
        adapted tensors `fast` (task-stacked, see expand_to_tasks): with per-step batch norm, that stage's bn
        rows are put in, one copy per task; with TaskNorm-I, its blend parameters (`tasknorm`, shared by the
        tasks)."""
        inputs = fast
        if self.bn_stages:
            tasks = fast["fc_bias"].shape[0]  # [T, 1, n_way]
            row = min(stage, self.bn_stages - 1)
            inputs = {name: paddle.tile(getattr(self, name)[row], [tasks]) if name in self.per_stage_names
                      else fast[name] for name in layer_names(self.blocks)}
        if self.tasknorm is not None:
            # A copy, not the parameter itself: maml.py pushes gradients back from these inputs, and paddle.grad
            # gives none to a leaf that is itself among the tensors it starts from.
            inputs = dict(inputs, tasknorm=self.tasknorm.clone())
        return inputs

    def inner_rates(self, step, lr):
        """{adapted name: step size} of inner `step`: the learned rates, or the fixed `lr`."""
        if self.inner_lr is None:
            return dict.fromkeys(self.adapted_names, lr)
        row = self.inner_lr[min(step, self.inner_lr.shape[0] - 1)]
        return {name: row[i] for i, name in enumerate(self.adapted_names)}


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
    (conv weights and bn vectors repeated on axis 0, the classifier's two given a leading task axis).
    Differentiable: the gradient of a copy flows back to the shared parameter (summed over tasks).
    Returns the kind it is given: a mapping {name: copies}, or a list in the same order (see by_name)."""
    named = by_name(params)
    stacked = {}
    for name, p in named.items():
        if name == "fc_weight":
            stacked[name] = paddle.tile(p.unsqueeze(0), [tasks, 1, 1])  # [T, F, n_way]
        elif name == "fc_bias":
            stacked[name] = paddle.tile(p.reshape([1, 1, -1]), [tasks, 1, 1])  # [T, 1, n_way]
        else:
            stacked[name] = paddle.tile(p, [tasks] + [1] * (len(p.shape) - 1))  # conv [T*C, Cin, k, k]; bn [T*C]
    return stacked if named is params else list(stacked.values())


# Added to the logit of an unused output: its softmax is then exactly 0 in float32 and float64, so it takes
# no probability and its gradient (softmax - one-hot) is exactly 0. Finite, unlike -inf, so that
# 0 * mask stays 0 in the cross-entropy.
MASKED_LOGIT = -1e9


def mask_outputs(params, classes):
    """Task-stacked parameters {name: tensor} (expand_to_tasks) whose logits beyond the first `classes` are masked out.

    The mask goes into the classifier bias copy: every forward pass of these parameters then has it,
    and since a masked logit's gradient is exactly 0, inner SGD steps keep it as it is."""
    fc_bias = params["fc_bias"]
    mask = paddle.to_tensor([0.0] * classes + [MASKED_LOGIT] * (fc_bias.shape[-1] - classes), dtype=fc_bias.dtype)
    return dict(params, fc_bias=fc_bias + mask)


def task_logits(params, x, blocks=4, stride=1, padding=1, support=None):
    """Logits [T, n, n_way] for images x [T, n, C, H, W], task t using its own parameters (task-stacked,
    {name: tensor}, see by_name).

    Batch norm uses the statistics of x itself (transductive), or, given `support` [T, s, C, H, W], those of
    each task's support images: they are forwarded together with x under the same parameters and only their
    rows are counted in the moments, so each row of x gets logits that depend on it and the support set only.
    With params["tasknorm"] (TaskNorm-I) every image's moments are blended with its own instance moments;
    without `support`, x is then the support set itself."""
    params = by_name(params, blocks)
    blend, rows = params.get("tasknorm"), None
    if support is not None:
        rows = support.shape[1]
        x = paddle.concat([support, x], axis=1)
    elif blend is not None:
        rows = x.shape[1]
    tasks, n = x.shape[0], x.shape[1]
    h = x.transpose([1, 0, 2, 3, 4]).reshape([n, tasks * x.shape[2], x.shape[3], x.shape[4]])
    # Between the layers the activations stay in the channel-blocked layout of oneDNN's CPU code where it
    # has one (double_grad_ops.activation_block; 0: plain NCHW), and become NCHW again for the classifier.
    layout = ops.activation_block(h, [params[block_names(b).conv] for b in range(blocks)], stride, padding, tasks)
    for b in range(blocks):
        weight, gamma, beta = (params[name] for name in block_names(b))
        h = ops.conv2d(h, weight, stride=stride, padding=padding, groups=tasks, block=layout)
        if rows is None:
            h = ops.batch_norm(h, gamma, beta)
        elif blend is None:
            h = ops.batch_norm_by_support(h, gamma, beta, rows)
        else:  # TaskNorm-I's weight of the support moments, from the support set's size
            alpha = paddle.nn.functional.sigmoid(blend[b, 0] * rows + blend[b, 1])
            h = batch_norm_by_rows(h, gamma, beta, rows, alpha)
        # ReLU after the pool instead of before: max commutes with a monotone function, so values and
        # gradients are the same, on a quarter of the elements.
        h = ops.max_pool2d_relu(h)
    features = ops.to_plain(h).reshape([n, tasks, -1]).transpose([1, 0, 2])
    logits = paddle.matmul(features, params["fc_weight"]) + params["fc_bias"]
    return logits if support is None else logits[:, rows:]


def batch_norm_by_rows(h, gamma, beta, rows, alpha=None, eps=1e-5):
    """Batch norm of every image of h (plain [n, C, H, W] or channel-blocked [n, C/b, H, W, b]) with the
    per-channel moments of its first `rows` images (biased variance and eps as ops.batch_norm, so those rows
    come out as ops.batch_norm of them alone would give them). Plain Paddle ops, differentiable to any order:
    TaskNorm-I's adaptation needs the second. Without alpha it defines ops.batch_norm_by_support, the fused
    first-order op that "support" mode runs (the tests hold one against the other).

    With `alpha` (TaskNorm-I), image i uses the moments of the mixture of the two distributions, weight alpha
    on the support rows' and 1 - alpha on its own over H, W: mean m = alpha m_s + (1 - alpha) m_i, variance
    alpha (v_s + (m_s - m)^2) + (1 - alpha) (v_i + (m_i - m)^2)."""
    shape = [1, -1, 1, 1] + ([h.shape[4]] if len(h.shape) == 5 else [])  # a per-channel vector against h
    counted = h[:rows]
    mean = counted.mean(axis=[0, 2, 3], keepdim=True)
    variance = ((counted - mean) ** 2).mean(axis=[0, 2, 3], keepdim=True)
    if alpha is not None:
        own_mean = h.mean(axis=[2, 3], keepdim=True)
        own_variance = ((h - own_mean) ** 2).mean(axis=[2, 3], keepdim=True)
        mixed = alpha * mean + (1 - alpha) * own_mean
        variance = alpha * (variance + (mean - mixed) ** 2) + (1 - alpha) * (own_variance + (own_mean - mixed) ** 2)
        mean = mixed
    scale = gamma.reshape(shape) * paddle.rsqrt(variance + eps)
    return (h - mean) * scale + beta.reshape(shape)


def task_losses(params, x, y, blocks=4, stride=1, padding=1, support=None):
    """(mean cross-entropy per task [T], logits [T, n, n_way]); `support` as in task_logits."""
    logits = task_logits(params, x, blocks, stride, padding, support)
    return ops.cross_entropy(logits, y).mean(axis=1), logits

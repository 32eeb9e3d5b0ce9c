"""MAML (Finn et al., 2017) in a few lines: copy the meta-parameters per task, adapt, evaluate.

All tasks of a meta-batch run together (see net.py), so `adapt` takes one gradient per step for the whole
meta-batch: the inner loss is the sum of the per-task losses, and since each task owns its parameter copy,
the gradient with respect to a copy is exactly that task's own gradient.

`first_order` is the only difference between MAML and FOMAML: with it False the inner gradients stay on the
graph (create_graph), so the meta-gradient differentiates through every inner step (second order); with it
True they are constants, and the same final `paddle.grad` yields the first-order (FOMAML) meta-gradient.
"""
import paddle

import net


class Episode:
    """A meta-batch of tasks as tensors: x [T, n, C, H, W] float, y [T, n] int64."""

    def __init__(self, x_spt, y_spt, x_qry, y_qry, dtype):
        def tensor(value, kind):
            if not isinstance(value, paddle.Tensor):
                value = paddle.to_tensor(value)
            return value.astype(kind)

        self.x_spt, self.x_qry = tensor(x_spt, dtype), tensor(x_qry, dtype)
        self.y_spt, self.y_qry = tensor(y_spt, "int64"), tensor(y_qry, "int64")
        self.tasks = self.x_spt.shape[0]


def adapt(model, params, x, y, steps, lr, first_order):
    """`steps` SGD steps of every task's parameters on its own support loss."""
    for _ in range(steps):
        losses, _ = net.task_losses(params, x, y, model.blocks, model.stride, model.padding)
        grads = paddle.grad(losses.sum(), params, create_graph=not first_order)
        params = [p - lr * g for p, g in zip(params, grads)]
    return params


def meta_gradients(model, episode, steps, lr, first_order):
    """(mean query loss, one meta-gradient per meta-parameter, query logits [T, n, n_way])."""
    meta_params = list(model.parameters())
    fast = adapt(model, net.expand_to_tasks(meta_params, episode.tasks), episode.x_spt, episode.y_spt,
                 steps, lr, first_order)
    losses, logits = net.task_losses(fast, episode.x_qry, episode.y_qry, model.blocks, model.stride,
                                     model.padding)
    query_loss = losses.mean()
    grads = paddle.grad(query_loss, meta_params)
    return query_loss, list(grads), logits


def evaluate(model, episode, steps, lr):
    """Per-task query accuracy [T] after `steps` adaptation steps (no meta-gradient needed)."""
    fast = adapt(model, net.expand_to_tasks(model.parameters(), episode.tasks), episode.x_spt,
                 episode.y_spt, steps, lr, first_order=True)
    with paddle.no_grad():
        logits = net.task_logits([p.detach() for p in fast], episode.x_qry, model.blocks, model.stride,
                                 model.padding)
        return accuracy(logits, episode.y_qry)


def accuracy(logits, labels):
    """Per-task fraction of correct predictions [T]."""
    correct = (logits.argmax(axis=-1) == labels).astype("float32")
    return correct.mean(axis=1)

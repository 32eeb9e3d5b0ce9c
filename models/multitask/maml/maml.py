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


# Tasks of a meta-batch are independent (each owns its parameter copy), so the meta-gradient is a sum over
# tasks and can be computed a few tasks at a time: memory then scales with the chunk, not the meta-batch
# (a 32-task query activation is 480 MB per tensor), and the same total kernel work is done.
TASKS_PER_CHUNK = 4


def adapted_chunks(model, params, episode, tasks_per_chunk, steps, lr, first_order):
    """For each chunk of consecutive tasks: (slice of the tasks, their parameters adapted on their support sets)."""
    for start in range(0, episode.tasks, tasks_per_chunk):
        part = slice(start, min(start + tasks_per_chunk, episode.tasks))
        copies = net.expand_to_tasks(params, part.stop - part.start)
        yield part, adapt(model, copies, episode.x_spt[part], episode.y_spt[part], steps, lr, first_order)


def _joined(pieces):
    return pieces[0] if len(pieces) == 1 else paddle.concat(pieces, axis=0)


def meta_gradients(model, episode, steps, lr, first_order, tasks_per_chunk=None):
    """(mean query loss, one meta-gradient per meta-parameter, query logits [T, n, n_way]).

    Per chunk of tasks: adapt on the support set, then take the query-loss gradient with respect to the
    adapted parameters (a first-order backward through the query graph, which is then released), then push
    it back through the adaptation graph (second order unless first_order) to the meta-parameters.
    """
    meta_params = list(model.parameters())
    loss_sum, grads, all_logits = None, None, []
    chunks = adapted_chunks(model, meta_params, episode, tasks_per_chunk or TASKS_PER_CHUNK, steps, lr, first_order)
    for part, fast in chunks:
        losses, logits = net.task_losses(fast, episode.x_qry[part], episode.y_qry[part], model.blocks,
                                         model.stride, model.padding)
        query_loss = losses.sum() / episode.tasks
        fast_grads = paddle.grad(query_loss, fast)
        loss_sum = query_loss.detach() if loss_sum is None else loss_sum + query_loss.detach()
        all_logits.append(logits.detach())
        del losses, logits, query_loss  # frees the query graph before the adaptation graph is walked
        chunk_grads = paddle.grad(fast, meta_params, grad_outputs=list(fast_grads))
        del fast, fast_grads
        grads = list(chunk_grads) if grads is None else [g + c for g, c in zip(grads, chunk_grads)]
    return loss_sum, grads, _joined(all_logits)


# Evaluation needs no meta-gradient, so large chunks are as fast as small ones here (100 5-way tasks at once:
# 5.2-6.2 s, in chunks of 25: 5.3-6.1 s per 100 tasks); the cap only bounds memory, which grows with the
# query images of a chunk (a 20-way 15-query task has 300; 100 of them would make 6 GB first-layer tensors).
EVAL_QUERY_IMAGES_PER_CHUNK = 2000


def evaluate(model, episode, steps, lr):
    """Per-task query accuracy [T] after `steps` adaptation steps (no meta-gradient needed)."""
    tasks_per_chunk = max(1, EVAL_QUERY_IMAGES_PER_CHUNK // episode.x_qry.shape[1])
    accuracies = []
    for part, fast in adapted_chunks(model, model.parameters(), episode, tasks_per_chunk, steps, lr,
                                     first_order=True):
        with paddle.no_grad():
            logits = net.task_logits([p.detach() for p in fast], episode.x_qry[part], model.blocks, model.stride,
                                     model.padding)
            accuracies.append(accuracy(logits, episode.y_qry[part]))
    return _joined(accuracies)


def accuracy(logits, labels):
    """Per-task fraction of correct predictions [T]."""
    correct = (logits.argmax(axis=-1) == labels).astype("float32")
    return correct.mean(axis=1)

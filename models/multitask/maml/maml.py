"""MAML (Finn et al., 2017) in a few lines: copy the meta-parameters per task, adapt, evaluate.

All tasks of a meta-batch run together (see net.py), so `adapt` takes one gradient per step for the whole
meta-batch: the inner loss is the sum of the per-task losses, and since each task owns its parameter copy,
the gradient with respect to a copy is exactly that task's own gradient.

`first_order` is the only difference between MAML and FOMAML: with it False the inner gradients stay on the
graph (create_graph), so the meta-gradient differentiates through every inner step (second order); with it
True they are constants, and the same final `paddle.grad` yields the first-order (FOMAML) meta-gradient.
"""
import paddle
import paddle.nn.functional as F

import net


class MetaBatch:
    """A meta-batch of tasks as tensors: x [T, n, C, H, W] float, y [T, n] int64 (omniglot_reader's
    Episode is one task's choice of images; the reader's batch of T tasks becomes one MetaBatch).

    y_qry may be None (query images to classify, not to score). `classes`: the tasks use only the first
    `classes` outputs of the network's n_way (None: all); the others are masked out (see adapted_chunks).
    """

    def __init__(self, x_spt, y_spt, x_qry, y_qry, dtype, classes=None):
        def tensor(value, kind):
            if not isinstance(value, paddle.Tensor):
                value = paddle.to_tensor(value)
            return value.astype(kind)

        self.x_spt, self.x_qry = tensor(x_spt, dtype), tensor(x_qry, dtype)
        self.y_spt = tensor(y_spt, "int64")
        self.y_qry = None if y_qry is None else tensor(y_qry, "int64")
        self.tasks = self.x_spt.shape[0]
        self.classes = classes


def adapt(model, fast, x, y, steps, lr, first_order):
    """`steps` SGD steps of every task's adapted parameters `fast` ({name: task-stacked tensor}) on its own
    support loss.

    Returns every stage: [fast, after 1 step, ..., after `steps` steps] (the multi-step loss reads them all)."""
    stages = [fast]
    for step in range(steps):
        inputs = model.layer_inputs(fast, step)
        losses, _ = net.task_losses(inputs, x, y, model.blocks, model.stride, model.padding)
        # The gradient is taken for every input of the network (Paddle's custom ops must not be asked
        # for a gradient that leads nowhere) and the adapted ones are kept.
        grads = dict(zip(inputs, paddle.grad(losses.sum(), list(inputs.values()), create_graph=not first_order)))
        rates = model.inner_rates(step, lr)
        fast = {name: p - rates[name] * grads[name] for name, p in fast.items()}
        stages.append(fast)
    return stages


# Tasks of a meta-batch are independent (each owns its parameter copy), so the meta-gradient is a sum over
# tasks and can be computed a few tasks at a time: memory then scales with the chunk, not the meta-batch
# (a 32-task query activation is 480 MB per tensor), and the same total kernel work is done. The default suits
# PaddleRec's 80 images a task; with few images a task every call is small and the calls' fixed cost dominates,
# so configs with 10 images a task set hyper_parameters.tasks_per_chunk higher (doc/maml.md has the figures).
TASKS_PER_CHUNK = 4


def adapted_chunks(model, meta_batch, tasks_per_chunk, steps, lr, first_order):
    """For each chunk of consecutive tasks: (slice of the tasks, the stages of their adaptation on their
    support sets)."""
    for start in range(0, meta_batch.tasks, tasks_per_chunk):
        part = slice(start, min(start + tasks_per_chunk, meta_batch.tasks))
        copies = net.expand_to_tasks(model.adapted_parameters(), part.stop - part.start)
        if meta_batch.classes is not None:
            # In every task's own copy of the classifier, so the support loss of every inner step and
            # the query logits all see the mask.
            copies = net.mask_outputs(copies, meta_batch.classes)
        yield part, adapt(model, copies, meta_batch.x_spt[part], meta_batch.y_spt[part], steps, lr, first_order)


def norm_support(model, meta_batch, part):
    """The images whose batch statistics normalise the query images of the tasks in `part` (net.task_logits):
    None for their own (model.norm "transductive"), else the support set ("support", "tasknorm_i"). While
    adapting, the support set is normalised with its own statistics in every mode (with TaskNorm-I, blended
    with each image's own)."""
    return None if model.norm == "transductive" else meta_batch.x_spt[part]


def _joined(pieces):
    return pieces[0] if len(pieces) == 1 else paddle.concat(pieces, axis=0)


def _query_gradients(model, stages, stage_weights, meta_batch, part):
    """For each weighted stage: the gradient of its weighted query loss with respect to the tensors that
    stage's network ran on (a first-order backward that releases the query graph). Returns (those tensors,
    their gradients, the weighted query loss, the last stage's query logits)."""
    outputs, output_grads, loss = [], [], 0.0
    for stage, weight in sorted(stage_weights.items()):  # the last stage comes last
        inputs = model.layer_inputs(stages[stage], stage)
        losses, logits = net.task_losses(inputs, meta_batch.x_qry[part], meta_batch.y_qry[part], model.blocks,
                                         model.stride, model.padding, norm_support(model, meta_batch, part))
        query_loss = weight * losses.sum() / meta_batch.tasks
        output_grads += paddle.grad(query_loss, list(inputs.values()))
        outputs += inputs.values()
        loss = loss + query_loss.detach()
    return outputs, output_grads, loss, logits.detach()


def meta_gradients(model, meta_batch, steps, lr, first_order, stage_weights=None, tasks_per_chunk=None):
    """(query loss, one meta-gradient per meta-parameter, query logits after the last step [T, n, n_way]).

    The meta-objective is the mean over tasks of the query loss after `steps` inner steps, or, with
    `stage_weights` {stage: weight} (the multi-step loss), the weighted sum of the query losses after those
    stages; the last stage must be among them. Per chunk of tasks: adapt on the support set, take the
    query gradients (`_query_gradients`), then push them all back through the adaptation graph in one pass
    (second order unless first_order) to the meta-parameters.
    """
    stage_weights = stage_weights or {steps: 1.0}
    if steps not in stage_weights:
        raise ValueError(f"stage_weights {stage_weights} must include the last stage {steps}")
    meta_params = list(model.parameters())
    loss_sum, grads, all_logits = 0.0, None, []
    for part, stages in adapted_chunks(model, meta_batch, tasks_per_chunk or TASKS_PER_CHUNK, steps, lr, first_order):
        outputs, output_grads, loss, logits = _query_gradients(model, stages, stage_weights, meta_batch, part)
        del stages
        chunk_grads = paddle.grad(outputs, meta_params, grad_outputs=output_grads, allow_unused=True)
        # Nothing may keep this chunk's adapted tensors once they are pushed back: they hold its whole
        # adaptation graph, which would then live through the next chunk (measured: +190 MB peak).
        del outputs, output_grads
        # A meta-parameter no stage used (the inner rates when steps == 0) has a zero meta-gradient.
        chunk_grads = [paddle.zeros_like(p) if g is None else g for p, g in zip(meta_params, chunk_grads)]
        grads = chunk_grads if grads is None else [g + c for g, c in zip(grads, chunk_grads)]
        loss_sum = loss_sum + loss
        all_logits.append(logits)
    return loss_sum, grads, _joined(all_logits)


# Evaluation needs no meta-gradient, so large chunks run as fast as small ones (doc/performance.md); the cap
# only bounds memory, which grows with the query images of a chunk (a 20-way 15-query task has 300; 100 of
# them would make 6 GB first-layer tensors).
EVAL_QUERY_IMAGES_PER_CHUNK = 2000


def query_logits(model, meta_batch, steps, lr):
    """Query logits [T, n, n_way] after `steps` adaptation steps on each task's support set (no
    meta-gradient needed); batch norm uses the batch statistics of the support set while adapting and, when
    classifying, of the query set (model.norm "transductive") or of the support set again (the other modes).
    What evaluation scores and what few_shot.py predicts with."""
    images = meta_batch.x_qry.shape[1] + (0 if model.norm == "transductive" else meta_batch.x_spt.shape[1])
    tasks_per_chunk = max(1, EVAL_QUERY_IMAGES_PER_CHUNK // images)
    logits = []
    for part, stages in adapted_chunks(model, meta_batch, tasks_per_chunk, steps, lr, first_order=True):
        with paddle.no_grad():
            inputs = model.layer_inputs({name: p.detach() for name, p in stages[-1].items()}, steps)
            logits.append(net.task_logits(inputs, meta_batch.x_qry[part], model.blocks, model.stride, model.padding,
                                          norm_support(model, meta_batch, part)))
    return _joined(logits)


class Ensemble:
    """Models evaluated as one (tools/infer.py's runner.infer_ensemble): each adapts to a task on its own, and
    their class probabilities are averaged."""

    def __init__(self, models):
        self.members = list(models)


def evaluate(model, meta_batch, steps, lr):
    """Per-task query accuracy [T] after `steps` adaptation steps (no meta-gradient needed); of an Ensemble, by
    the mean of its members' class probabilities."""
    if isinstance(model, Ensemble):
        probabilities = [F.softmax(query_logits(member, meta_batch, steps, lr), axis=-1) for member in model.members]
        return accuracy(paddle.add_n(probabilities) / len(probabilities), meta_batch.y_qry)
    return accuracy(query_logits(model, meta_batch, steps, lr), meta_batch.y_qry)


def accuracy(logits, labels):
    """Per-task fraction of correct predictions [T]."""
    correct = (logits.argmax(axis=-1) == labels).astype("float32")
    return correct.mean(axis=1)

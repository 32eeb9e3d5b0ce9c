"""PaddleRec's model-plugin interface for MAML on Omniglot; the algorithm itself is in maml.py."""
import math

import numpy as np
import paddle

import config_checks as checks
import cpu_schedule
import double_grad_ops  # noqa: F401  (tests reach the ops through the plugin module, as the tools load it)
import kernel_replay
import maml
import net

cpu_schedule.prepare_cpu_process()  # before the first large tensor; see cpu_schedule.py

# Keys this model reads with a default (the tools merge them under the YAML, so `-o` can set them too).
CONFIG_DEFAULTS = {
    "hyper_parameters.first_order": False,
    "hyper_parameters.update_step": 5,
    "hyper_parameters.update_step_test": 10,
    "hyper_parameters.imgsize": 28,
    "hyper_parameters.conv_stride": 1,
    "hyper_parameters.conv_padding": 1,
    "hyper_parameters.conv_kernal": [3, 3],
    "hyper_parameters.bn_channel": 64,
    "hyper_parameters.meta_optimizer.class": "Adam",
    "hyper_parameters.meta_optimizer.learning_rate": 0.001,
    "hyper_parameters.base_optimizer.class": "SGD",
    "hyper_parameters.base_optimizer.learning_rate": 0.1,
    "hyper_parameters.rotations": False,  # read by omniglot_reader.py: 4 rotated classes per character
    "hyper_parameters.rotations_test": None,  # read by omniglot_reader.py: rotations when evaluating
    "hyper_parameters.k_query_test": None,  # read by omniglot_reader.py: query images per class when evaluating
    "hyper_parameters.task_sampling": "any",  # read by omniglot_reader.py: "within_alphabet": one alphabet per task
    "hyper_parameters.task_sampling_test": None,  # read by omniglot_reader.py: task_sampling when evaluating
    "hyper_parameters.skip_small_alphabets": False,  # read by omniglot_reader.py: leave out alphabets < n_way classes
    "hyper_parameters.skip_small_alphabets_test": None,  # read by omniglot_reader.py: the same when evaluating
    "hyper_parameters.train_shift": 0,  # read by omniglot_reader.py: random shift of training images, in pixels
    # MAML++ (Antoniou et al., 2019), each off by default; all off is the MAML paper's algorithm.
    "hyper_parameters.multi_step_loss_epochs": 0,  # > 0: query loss after every inner step, annealed to the last
    "hyper_parameters.learn_inner_lr": False,  # a learned inner rate per adapted tensor per inner step
    "hyper_parameters.per_step_bn": False,  # batch-norm gamma/beta per inner stage, learned by the outer loop
    "hyper_parameters.meta_optimizer.cosine_annealing": False,  # meta rate follows a cosine to 1% by the end
    "hyper_parameters.first_order_epochs": 0,  # the first N epochs first-order, second-order after
    "hyper_parameters.tasks_per_chunk": maml.TASKS_PER_CHUNK,  # tasks per pass: memory against speed, same result
    # Batch norm of the query images, in meta-training and evaluation (net.NORM_MODES): "transductive" (MAML's, the
    # query set's own statistics), "support" (the support set's: a query image's class does not depend on the
    # others) or "tasknorm_i" (the support set's blended with each image's own, a learned weight per block).
    "hyper_parameters.norm_mode": "transductive",
}

# Printed once by infer and validation summaries: how these accuracies were measured ({key}: the run's value).
EVALUATION_NOTE = ("query accuracy after update_step_test SGD steps on each task's support set; query images batch "
                   "normalised {hyper_parameters.norm_mode} (transductive: with their own batch statistics, as in "
                   "MAML; support: with the support set's; tasknorm_i: with the support set's blended with each "
                   "image's own); mean over all tasks, 95% CI")

# Named by the trainer when a loss or meta-gradient turns NaN or infinite: the usual culprits.
NON_FINITE_KEYS = {"hyper_parameters.base_optimizer.learning_rate": "the inner learning rate",
                   "hyper_parameters.meta_optimizer.learning_rate": "the meta learning rate"}

# tools/benchmark.py times one meta-iteration per variant (first the one a ratio is taken against).
# The benchmark times epoch 0, so the second-order variant also turns off the first-order epochs (MAML++'s
# derivative-order annealing) that would otherwise make it first order for configs such as config_bigdata.yaml.
BENCHMARK_VARIANTS = [{"hyper_parameters.first_order": True},
                      {"hyper_parameters.first_order": False, "hyper_parameters.first_order_epochs": 0}]
BENCHMARK_LABELS = {"samples": "tasks", "kernels": "conv"}  # its columns: tasks/s, conv s, conv %
# learn2learn's MAML on PyTorch, the harness of ../shared/peers (built as its README says, in a folder passed
# as --peer): the workload of config_paddlerec.yaml, one command per variant above (first order, second order).
_PEER_RUN = ["venv/bin/python", "maml_omniglot.py", "--impl", "l2l", "--mode", "bench", "--bench-iters", "{iterations}"]
BENCHMARK_PEER = {"label": "l2l", "config": "config_paddlerec.yaml", "seconds": r"s/iter median ([0-9.]+)",
                  "commands": [_PEER_RUN + ["--first-order"], _PEER_RUN]}


def _with_defaults(check):
    """`check` (a config_checks function) with this plugin's CONFIG_DEFAULTS as the defaults."""
    return lambda config, key: check(config, key, CONFIG_DEFAULTS.get(key))


_get = _with_defaults(checks.setting)
_positive_int = _with_defaults(checks.positive_int)
_nonnegative_int = _with_defaults(checks.nonnegative_int)
_bool = _with_defaults(checks.boolean)
_positive_float = _with_defaults(checks.positive_float)


def norm_mode(config):
    """hyper_parameters.norm_mode, one of net.NORM_MODES."""
    key = "hyper_parameters.norm_mode"
    return checks.choice(config, key, net.NORM_MODES, CONFIG_DEFAULTS[key])


def inner_settings(config, training, epoch=0):
    """(steps, inner learning rate, first_order) for training in `epoch`, or for test-time adaptation."""
    steps = _nonnegative_int(config, "hyper_parameters.update_step" if training else
                             "hyper_parameters.update_step_test")
    lr = _positive_float(config, "hyper_parameters.base_optimizer.learning_rate")
    if _get(config, "hyper_parameters.base_optimizer.class") != "SGD":
        # MAML's inner loop is plain gradient descent; say so rather than ignore the key (PaddleRec did).
        raise checks.error(config, "hyper_parameters.base_optimizer.class", "only SGD is supported for the inner loop")
    first_order = _bool(config, "hyper_parameters.first_order")
    # Derivative-order annealing (MAML++): cheap first-order epochs first, then the exact meta-gradient.
    first_order = first_order or epoch < _nonnegative_int(config, "hyper_parameters.first_order_epochs")
    return steps, lr, first_order or not training


def multi_step_weights(config, epoch):
    """{stage: weight} of the query losses in the meta-objective during `epoch` (see maml.meta_gradients).

    MAML: only the last stage. Multi-step loss (MAML++): every stage after an inner step, equal weights at
    epoch 0 moving linearly to all on the last stage at epoch multi_step_loss_epochs (plain MAML from then
    on); the early stages' losses give the first layers a direct signal while training is young.
    """
    steps = _nonnegative_int(config, "hyper_parameters.update_step")
    anneal_epochs = _nonnegative_int(config, "hyper_parameters.multi_step_loss_epochs")
    if anneal_epochs == 0 or steps <= 1:
        return {steps: 1.0}
    last_share = min(1.0, epoch / anneal_epochs)
    weights = {stage: (1.0 - last_share) / steps for stage in range(1, steps + 1)}
    weights[steps] += last_share
    return {stage: w for stage, w in weights.items() if w > 0}


class TaskAccuracy(paddle.metric.Metric):
    """Mean query accuracy over every evaluated task, with its 95% confidence interval.

    accumulate() is the mean accuracy (a number, as PaddleRec's tools print it with {:.6f});
    details() adds the interval and the task count for our tools' logs and metrics file.
    """

    def __init__(self):
        super().__init__()
        self.reset()

    def reset(self):
        self._accs = []

    def name(self):
        return "acc"

    def update(self, task_accuracies):
        self._accs.extend(float(a) for a in np.asarray(task_accuracies).reshape(-1))

    def state(self):
        """The per-task accuracies so far (picklable): what a data-parallel rank contributes."""
        return list(self._accs)

    def merge_states(self, states):
        """Become the metric over the tasks of all `states` (one per rank, rank 0 first)."""
        self._accs = [float(a) for state in states for a in state]

    def accumulate(self):
        return float(np.mean(self._accs)) if self._accs else float("nan")

    def details(self):
        accs = np.asarray(self._accs, dtype=np.float64)
        n = len(accs)
        ci95 = 1.96 * accs.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
        return {"acc": self.accumulate(), "acc_ci95": float(ci95), "tasks": n}


def _meta_steps(config):
    """Meta-batches in the whole run: runner.epochs x ceil(runner.tasks_per_epoch / runner.train_batch_size)."""
    batches = -(-_positive_int(config, "runner.tasks_per_epoch") // _positive_int(config, "runner.train_batch_size"))
    return _positive_int(config, "runner.epochs") * batches


class DygraphModel:
    epoch = 0  # the training epoch, for the schedules of the MAML++ options (the trainer calls set_epoch)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def create_model(self, config):
        kernel = _get(config, "hyper_parameters.conv_kernal")
        if not (isinstance(kernel, list) and len(kernel) == 2 and kernel[0] == kernel[1]
                and checks.is_int(kernel[0]) and kernel[0] > 0):
            raise checks.error(config, "hyper_parameters.conv_kernal",
                               f"expected a square kernel like [3, 3], got {kernel!r}")
        steps = _nonnegative_int(config, "hyper_parameters.update_step")
        _positive_int(config, "hyper_parameters.tasks_per_chunk")  # read by every meta-step; a bad value stops here
        learn_inner_lr = _bool(config, "hyper_parameters.learn_inner_lr")
        if learn_inner_lr and steps == 0:
            raise checks.error(config, "hyper_parameters.learn_inner_lr", "needs hyper_parameters.update_step >= 1")
        try:
            return net.MAMLNet(
                n_way=_positive_int(config, "hyper_parameters.n_way"),
                channels=_positive_int(config, "hyper_parameters.bn_channel"),
                kernel=kernel[0],
                stride=_positive_int(config, "hyper_parameters.conv_stride"),
                padding=_nonnegative_int(config, "hyper_parameters.conv_padding"),
                imgsize=_positive_int(config, "hyper_parameters.imgsize"),
                bn_stages=steps + 1 if _bool(config, "hyper_parameters.per_step_bn") else 0,
                lr_steps=steps if learn_inner_lr else 0,
                inner_lr_init=_positive_float(config, "hyper_parameters.base_optimizer.learning_rate"),
                norm=norm_mode(config),
            )
        except net.ShapeError as e:
            raise checks.error(config, "hyper_parameters.imgsize", str(e)) from None

    def create_feeds(self, batch_data, config):
        """Tensors (x_spt, y_spt, x_qry, y_qry) in the model's dtype from the reader's batch.

        Nothing in this repository calls it, and neither do PaddleRec's own trainer.py and infer.py (they
        hand the reader's batch to train_forward / infer_forward, which convert it themselves). It is kept
        because PaddleRec's plugin convention lists it: code written against that convention may call it.
        """
        batch = maml.MetaBatch(*batch_data[:4], dtype=paddle.get_default_dtype())
        return batch.x_spt, batch.y_spt, batch.x_qry, batch.y_qry

    def create_optimizer(self, dy_model, config):
        name = _get(config, "hyper_parameters.meta_optimizer.class")
        optimizer_class = getattr(paddle.optimizer, str(name), None)
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, paddle.optimizer.Optimizer)):
            raise checks.error(config, "hyper_parameters.meta_optimizer.class", f"unknown paddle optimizer {name!r}")
        lr = _positive_float(config, "hyper_parameters.meta_optimizer.learning_rate")
        if _bool(config, "hyper_parameters.meta_optimizer.cosine_annealing"):
            # One cosine over the whole run, ending at 1% of the rate (MAML++'s 1e-5 for 1e-3). The trainer steps
            # it once per meta-batch and the checkpoints keep the step count. A closed form of the step, not
            # Paddle's CosineAnnealingDecay: that one is recursive in the previous rate, so a run resumed with
            # more epochs would stay at the old run's final rate.
            total = max(1, _meta_steps(config))
            lr = paddle.optimizer.lr.LambdaDecay(lr, lambda step: 0.01 + 0.99 * (1 + math.cos(math.pi * min(step, total)
                                                                                          / total)) / 2)
        return optimizer_class(learning_rate=lr, parameters=dy_model.parameters())

    def create_metrics(self):
        return [TaskAccuracy()], ["acc"]

    @staticmethod
    def meta_gradients(model, batch, config, epoch=0):
        """(mean query loss, meta-gradients in model.parameters() order) for one meta-batch.

        Touches no optimizer and no `.grad`. Second order unless hyper_parameters.first_order is true
        (or `epoch` < hyper_parameters.first_order_epochs); `epoch` also sets the multi-step loss weights.
        """
        loss, grads, _ = DygraphModel._meta_step(model, batch, config, epoch)
        return loss, grads

    @staticmethod
    def _meta_step(model, batch, config, epoch=0):
        steps, lr, first_order = inner_settings(config, training=True, epoch=epoch)
        meta_batch = maml.MetaBatch(*batch[:4], dtype=model.parameters()[0].dtype)
        return maml.meta_gradients(model, meta_batch, steps, lr, first_order, multi_step_weights(config, epoch),
                                   _positive_int(config, "hyper_parameters.tasks_per_chunk"))

    @staticmethod
    def kernel_seconds(model, batch, config):
        """Seconds the convolution kernels of one meta-iteration take when run bare (for benchmarks)."""
        with kernel_replay.recording_convolutions() as calls:
            DygraphModel._meta_step(model, batch, config)
        return kernel_replay.replay_seconds(calls, model.parameters()[0].dtype), len(calls)

    def train_forward(self, dy_model, metrics_list, batch_data, config):
        """Returns a loss whose value is the meta-objective (the mean query loss; with the multi-step loss, its
        weighted sum over the inner stages) and whose `backward()` leaves exactly the meta-gradient in every
        parameter's `.grad`, so the trainer's backward/step applies MAML."""
        query_loss, grads, logits = self._meta_step(dy_model, batch_data, config, self.epoch)
        params = dy_model.parameters()
        # d/dp of sum(p * g) is g; the detached terms only make the value equal the query loss.
        surrogate = query_loss.detach() + sum((p * g).sum() - (p.detach() * g).sum() for p, g in zip(params, grads))
        task_acc = maml.accuracy(logits.detach(), paddle.to_tensor(np.asarray(batch_data[3])).astype("int64"))
        metrics_list[0].update(task_acc.numpy())  # query accuracy after adaptation, over the epoch so far
        return surrogate, metrics_list, {"loss": query_loss.detach()}

    def infer_forward(self, dy_model, metrics_list, batch_data, config):
        """Query accuracy of every task in the batch after `update_step_test` adaptation steps,
        batch norm as the model's norm mode says (hyper_parameters.norm_mode); of an ensemble (see ensemble()), by its
        members' mean class probabilities."""
        steps, lr, _ = inner_settings(config, training=False)
        first = dy_model.members[0] if isinstance(dy_model, maml.Ensemble) else dy_model
        meta_batch = maml.MetaBatch(*batch_data[:4], dtype=first.parameters()[0].dtype)
        task_acc = maml.evaluate(dy_model, meta_batch, steps, lr).numpy()
        metrics_list[0].update(task_acc)
        # A tensor, as PaddleRec's infer prints every value's .numpy().
        return metrics_list, {"acc": paddle.to_tensor(float(task_acc.mean()))}

    def ensemble(self, models, config):
        """tools/infer.py's hook for runner.infer_ensemble: the models as one for infer_forward, which averages
        their class probabilities (MAML++ reports such an ensemble of its 3 best validated checkpoints)."""
        return maml.Ensemble(models)

    def predict(self, dy_model, config, support, queries):
        """tools/predict.py's hook: adapt on support [(class name, [image paths])], classify the query image
        paths; see few_shot.predict_files."""
        import few_shot  # here, not at the top: few_shot imports this module (inner_settings)

        return few_shot.predict_files(dy_model, config, support, queries)

"""PaddleRec's model-plugin interface for MAML on Omniglot; the algorithm itself is in maml.py."""
import math

import numpy as np
import paddle

import few_shot
import maml
import maml_kernels
import maml_settings as settings
import net

maml_kernels.prepare_cpu_process()  # before the first large tensor; see maml_kernels/cpu_schedule.py

# Keys this model reads with a default (the tools merge them under the YAML, so `-o` can set them too); the
# whole table, with types, ranges and meanings, is maml_settings.TABLE.
CONFIG_DEFAULTS = settings.CONFIG_DEFAULTS

# Printed once by infer and validation summaries: how these accuracies were measured ({key}: the run's value).
EVALUATION_NOTE = ("query accuracy after update_step_test SGD steps on each task's support set; query images batch "
                   "normalised {hyper_parameters.norm_mode} (transductive: with their own batch statistics, as in "
                   "MAML; support: with the support set's; tasknorm_i: with the support set's blended with each "
                   "image's own); mean over all tasks, 95% CI")

# Named by the trainer when a loss or meta-gradient turns NaN or infinite: the usual culprits.
NON_FINITE_KEYS = {"hyper_parameters.base_optimizer.learning_rate": "the inner learning rate",
                   "hyper_parameters.meta_optimizer.learning_rate": "the meta learning rate"}

# The keys this model reads without a default (the YAML sets them); the tools warn about a YAML key that neither
# this nor CONFIG_DEFAULTS declares, as a likely typo.
CONFIG_KEYS = [key for key in settings.TABLE if key not in CONFIG_DEFAULTS]

# tools/benchmark.py times one meta-iteration per variant (first the one a ratio is taken against).
# The benchmark times epoch 0, so the second-order variant also turns off the first-order epochs (MAML++'s
# derivative-order annealing) that would otherwise make it first order for configs such as config_bigdata.yaml.
BENCHMARK_VARIANTS = [{"hyper_parameters.first_order": True},
                      {"hyper_parameters.first_order": False, "hyper_parameters.first_order_epochs": 0}]
BENCHMARK_LABELS = {"samples": "tasks", "kernels": "conv"}  # its columns: tasks/s, conv s, conv %

# Recorded in every checkpoint's meta.json: a model trained in one norm mode and evaluated in another gets a warning.
RECORDED_KEYS = ["hyper_parameters.norm_mode"]


def norm_mode(config):
    """hyper_parameters.norm_mode, one of net.NORM_MODES."""
    return settings.choice(config, "hyper_parameters.norm_mode", net.NORM_MODES)


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


def evaluation_classes(config):
    """How many of the head's n_way outputs evaluation tasks use: hyper_parameters.n_way_test when set, else all
    (None). Labels are permuted at random in every task, so each output unit is trained for every label alike and
    the first n_way_test units serve as well as any."""
    n_way = settings.positive_int(config, "hyper_parameters.n_way")
    if config.get("hyper_parameters.n_way_test") is None:
        return None
    n_way_test = settings.positive_int(config, "hyper_parameters.n_way_test")
    if n_way_test > n_way:
        raise settings.error(config, "hyper_parameters.n_way_test",
                             f"{n_way_test} classes per evaluation task, but the network has n_way = {n_way} "
                             f"outputs; use at most {n_way}")
    return n_way_test if n_way_test < n_way else None


class DygraphModel:
    epoch = 0  # the training epoch, for the schedules of the MAML++ options (the trainer calls set_epoch)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def create_model(self, config):
        try:
            maml_kernels.conv_threads()  # the engine's environment variable, checked before the first batch
        except maml_kernels.BadVariable as e:
            raise settings.error(config, e.name, e.message) from None
        kernel = settings.kernel_size(config)
        steps = settings.inner_settings(config, training=True).steps
        settings.positive_int(config, "hyper_parameters.tasks_per_chunk")  # read by every meta-step; stop here
        evaluation_classes(config)  # likewise for every validation and test batch
        learn_inner_lr = settings.boolean(config, "hyper_parameters.learn_inner_lr")
        if learn_inner_lr and steps == 0:
            raise settings.error(config, "hyper_parameters.learn_inner_lr", "needs hyper_parameters.update_step >= 1")
        try:
            return net.MAMLNet(
                n_way=settings.positive_int(config, "hyper_parameters.n_way"),
                channels=settings.positive_int(config, "hyper_parameters.bn_channel"),
                kernel=kernel,
                stride=settings.positive_int(config, "hyper_parameters.conv_stride"),
                padding=settings.nonnegative_int(config, "hyper_parameters.conv_padding"),
                imgsize=settings.positive_int(config, "hyper_parameters.imgsize"),
                bn_stages=steps + 1 if settings.boolean(config, "hyper_parameters.per_step_bn") else 0,
                lr_steps=steps if learn_inner_lr else 0,
                inner_lr_init=settings.positive_float(config, "hyper_parameters.base_optimizer.learning_rate"),
                norm=norm_mode(config),
            )
        except net.ShapeError as e:
            raise settings.error(config, "hyper_parameters.imgsize", str(e)) from None

    def create_optimizer(self, dy_model, config):
        optimizer_class = settings.optimizer_class(config, paddle.optimizer, paddle.optimizer.Optimizer)
        lr = settings.positive_float(config, "hyper_parameters.meta_optimizer.learning_rate")
        if settings.boolean(config, "hyper_parameters.meta_optimizer.cosine_annealing"):
            # One cosine over the whole run, ending at 1% of the rate (MAML++'s 1e-5 for 1e-3). The trainer steps
            # it once per meta-batch and the checkpoints keep the step count. A closed form of the step, not
            # Paddle's CosineAnnealingDecay: that one is recursive in the previous rate, so a run resumed with
            # more epochs would stay at the old run's final rate.
            total = max(1, settings.meta_steps(config))
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
        steps, lr, first_order = settings.inner_settings(config, training=True, epoch=epoch)
        meta_batch = maml.MetaBatch(*batch[:4], dtype=model.parameters()[0].dtype)
        return maml.meta_gradients(model, meta_batch, steps, lr, first_order,
                                   settings.multi_step_weights(config, epoch),
                                   settings.positive_int(config, "hyper_parameters.tasks_per_chunk"))

    @staticmethod
    def kernel_seconds(model, batch, config):
        """Seconds the convolution kernels of one meta-iteration take when run bare (for benchmarks)."""
        with maml_kernels.recording_convolutions() as calls:
            DygraphModel._meta_step(model, batch, config)
        return maml_kernels.replay_seconds(calls, model.parameters()[0].dtype), len(calls)

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
        members' mean class probabilities. With n_way_test < n_way only the first n_way_test outputs take part."""
        steps, lr, _ = settings.inner_settings(config, training=False)
        first = dy_model.members[0] if isinstance(dy_model, maml.Ensemble) else dy_model
        meta_batch = maml.MetaBatch(*batch_data[:4], dtype=first.parameters()[0].dtype,
                                    classes=evaluation_classes(config))
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
        return few_shot.predict_files(dy_model, config, support, queries)

"""Train a PaddleRec-style model plugin.

    python tools/trainer.py -m models/<...>/config.yaml [-o key=value ...]
    python -u ../../../tools/trainer.py -m config.yaml      (from a model folder)

The loop is PaddleRec's: the plugin (dygraph_model.py next to the config)
builds the model, optimizer and metrics and computes the loss; this tool
owns epochs, checkpoints, logging and the metrics file, and knows nothing
about any particular model.

Validation (runner.valid_data_dir set): after the checkpoint of every
runner.valid_interval-th epoch (and of the last one), the plugin's
infer_forward runs over the validation data through the same evaluation
loop as infer.py; the best epoch by runner.valid_metric goes into
<runner.model_save_path>/best.json (tools/utils/evaluation.py).

Data-parallel (doc/distributed.md):
    python -m paddle.distributed.launch --nproc_per_node N tools/trainer.py -m <config> -o runner.use_fleet=True
Each rank trains on its share of every batch; gradients are averaged after
backward(), so every rank applies the same update; rank 0 writes the
checkpoints and the metrics file.
"""
import contextlib
import os
import sys
import time
from dataclasses import dataclass


if not __package__:  # run as a script, not imported as tools.<name>
    import _repo_path  # noqa: F401  (puts the repository root, not tools/, on sys.path)

# None of these import paddle at import time: the environment must be
# prepared (startup.load_run_config) before Paddle starts.
from tools.utils.checkpoint import (latest_checkpoint, load_checkpoint, lock_run_folder, read_checkpoint_meta,  # noqa: E402
                                    remove_stale_staging, replace_old_run, save_checkpoint)
from tools.utils.cli import config_arg_parser, load_run_config, run_tool  # noqa: E402
from tools.utils.console import UserError, format_train_line, format_values, log, progress_bar, warn  # noqa: E402
from tools.utils.data import batches_then_none, count_samples, create_data_loader, expected_batches, loader_batch_size  # noqa: E402
from tools.utils.distributed import merged_results, setup_data_parallel  # noqa: E402
from tools.utils.environment import cpu_thread_count, environment_snapshot, epoch_seed, seed_everything, select_device  # noqa: E402
from tools.utils.evaluation import (BEST_FILE, MODES, ModelSelection, evaluate, evaluation_loader, format_results,  # noqa: E402
                                    validation_config, validation_enabled)
from tools.utils.metrics import (IntervalStats, MetricsLog, NumericGuard, likely_causes,  # noqa: E402
                                 open_visual_log, scalar_dict, to_scalar)
from tools.utils.plugin import evaluation_note, load_model_plugin, non_finite_keys  # noqa: E402


AUTO_RESUME = "auto"


def learning_rate_scheduler(optimizer):
    """The optimizer's LRScheduler, or None for a fixed learning rate."""
    import paddle

    # Paddle has no public accessor for the scheduler object itself.
    learning_rate = getattr(optimizer, "_learning_rate", None)
    if isinstance(learning_rate, paddle.optimizer.lr.LRScheduler):
        return learning_rate
    return None


def resume_path_of(config, save_dir, parallel):
    """The checkpoint folder to resume from, or None for a fresh start.

    runner.resume_path "auto" is the newest complete epoch folder in
    runner.model_save_path (None when there is none); all ranks must find the same one.
    """
    if config.get("runner.resume_path") != AUTO_RESUME:
        return config.resolve_path("runner.resume_path", required=False)
    folder = latest_checkpoint(save_dir)
    # Compared by name: the absolute paths may differ between hosts.
    parallel.check_same(folder and os.path.basename(folder),
                        f"the newest checkpoint in {save_dir} (runner.resume_path=auto; it must be a shared folder)")
    if folder is None:
        log(f"runner.resume_path=auto: no checkpoint in {save_dir}; starting fresh")
    return folder


def warm_start_path_of(config):
    """runner.model_init_path as PaddleRec means it: parameters to start from (epoch 0, fresh optimizer)."""
    path = config.resolve_path("runner.model_init_path", required=False)
    if path is None:
        return None
    if config.get("runner.resume_path"):
        raise config.error("runner.model_init_path", "set either it (warm start: parameters only, from epoch 0) "
                           "or runner.resume_path (continue a run), not both")
    if not os.path.isdir(path):
        hint = " (to continue a run use runner.resume_path=auto)" if config.get("runner.model_init_path") == \
            AUTO_RESUME else ""
        raise config.error("runner.model_init_path", f"checkpoint folder {path} not found{hint}")
    return path


def warm_start(model, path):
    """Load the parameters of the epoch folder `path` (PaddleRec's load_model); the optimizer starts fresh."""
    load_checkpoint(path, model)
    log(f"warm start: parameters from {path}; training starts at epoch 0 with a fresh optimizer")


def resume(config, model, optimizer, init_path):
    """Load the checkpoint folder `init_path` (None: fresh start); return (first epoch, global step)."""
    if init_path is None:
        return 0, 0
    if not os.path.isdir(init_path):
        raise config.error("runner.resume_path", f"checkpoint folder {init_path} not found")
    epoch = load_checkpoint(init_path, model, optimizer)
    scheduler = learning_rate_scheduler(optimizer)
    if scheduler is not None:
        # The checkpoint holds the step count and the old run's current rate; recompute the rate at that
        # step under this run's settings (a run resumed with more epochs stretches its schedule).
        scheduler.step(scheduler.last_epoch)
    step = read_checkpoint_meta(init_path).get("extra", {}).get("step", 0)
    if epoch is None:
        log(f"loaded {init_path} (epoch unknown); training starts at epoch 0")
        return 0, int(step)
    log(f"resumed from {init_path}: continuing at epoch {epoch + 1}")
    return epoch + 1, int(step)


@dataclass
class TrainingRun:
    """What every epoch of one training run needs."""
    model_obj: object
    model: object
    optimizer: object
    config: dict
    metrics_log: MetricsLog
    print_interval: int
    batch_size: int  # of this rank's loader
    step: int  # global batch count, continued across a resume
    parallel: object  # tools.utils.distributed.Ranks
    seed: int  # runner.seed
    numeric_guard: NumericGuard  # stops the run at a NaN or infinite loss, gradient or parameter
    visual: object = None  # tools.utils.metrics.VisualLog when runner.use_visual is on (rank 0)


def run_epoch(run, epoch, loader):
    """Train one epoch; return (summary values, batches, samples, seconds).

    In a data-parallel run all ranks go through this loop in step: one
    gradient all-reduce per batch (which also tells every rank when all are
    out of batches; a rank with none left contributes nothing and still
    steps), and the metric merges at the log lines and at the end.
    """
    model_obj, model, optimizer, config = run.model_obj, run.model, run.optimizer, run.config
    parallel = run.parallel
    # The ranks may arrive far apart (data building, rank 0 writing the last
    # checkpoint); within the epoch they meet at every batch.
    parallel.barrier(f"epoch {epoch}: start")
    model.train()
    # Optional plugin hook: a model whose training changes with the epoch (schedules) learns it here.
    if hasattr(model_obj, "set_epoch"):
        model_obj.set_epoch(epoch)
    metrics, names = model_obj.create_metrics()
    scheduler = learning_rate_scheduler(optimizer)
    interval = IntervalStats()
    loss_sum, batches, samples = 0.0, 0, 0
    epoch_start = time.perf_counter()
    bar = progress_bar(expected_batches(loader), f"epoch {epoch}")
    batch_start = time.perf_counter()
    batch_iterator = batches_then_none(loader)
    batch_id = 0
    while True:
        batch = next(batch_iterator)
        if batch is None and not parallel.enabled:
            break
        reader_cost = time.perf_counter() - batch_start
        loss, own_samples, print_dict = None, 0, {}
        if batch is not None:
            loss, metrics, print_dict = model_obj.train_forward(model, metrics, batch, config)
            loss.backward()
            own_samples = count_samples(batch, run.batch_size)
        # --- data-parallel hook -------------------------------------------
        # Every rank's .grad becomes the sample-weighted mean over the ranks
        # (one all-reduce), so all ranks take the same optimizer step.
        if parallel.enabled:
            active, batch_samples, loss_value = parallel.sync_gradients(
                model.parameters(), own_samples, loss, f"epoch {epoch}, batch {batch_id}: gradient all-reduce")
            if not active:
                break  # every rank is out of batches
            # A rank whose share of this batch was empty (a last batch smaller
            # than the world size) received the others' mean and steps too.
        else:
            batch_samples, loss_value = own_samples, to_scalar(loss)
        # -------------------------------------------------------------------
        run.numeric_guard.check_batch(loss_value, model, epoch, batch_id)  # before the update spreads it
        learning_rate = optimizer.get_lr()  # the rate this batch's update uses
        optimizer.step()
        optimizer.clear_grad()
        if scheduler is not None:
            scheduler.step()
        interval.add(reader_cost, time.perf_counter() - batch_start, batch_samples, loss_value)
        loss_sum += loss_value
        batches += 1
        samples += batch_samples
        run.step += 1
        if batch_id % run.print_interval == 0:
            shown = {key: value for key, value in scalar_dict(print_dict).items() if key != "loss"}
            shown, metric_values = merged_results(parallel, metrics, names, model_obj.create_metrics,
                                                  f"epoch {epoch}, batch {batch_id}: merging metrics",
                                                  shown, own_samples)
            values = {"loss": interval.mean_loss(), **shown, **metric_values}
            speed = interval.averages()
            log(format_train_line(epoch, batch_id, values, **speed))
            run.metrics_log.write(
                "train", {"epoch": epoch, "batch": batch_id, "step": run.step, "lr": learning_rate},
                {**values, **speed})
            if run.visual is not None:
                run.visual.add(values, run.step)
            interval.reset()
        bar.update(1)
        batch_id += 1
        batch_start = time.perf_counter()
    bar.close()
    if batches == 0:
        warn(f"epoch {epoch}: the training loader gave no batches")
    summary = {"loss": loss_sum / max(batches, 1)}
    if batches:
        summary.update(merged_results(parallel, metrics, names, model_obj.create_metrics,
                                      f"epoch {epoch}: merging metrics")[1])
    return summary, batches, samples, time.perf_counter() - epoch_start


@dataclass
class Validation:
    """Validation settings of a run (runner.valid_*) and the best epoch so far."""
    config: dict  # the config view the reader and the plugin see (tools.utils.evaluation.validation_config)
    interval: int
    metric: str
    mode: str
    batch_size: int  # of this rank's loader
    selection: ModelSelection

    @classmethod
    def from_config(cls, config, save_dir, world_size):
        """None when runner.valid_data_dir is empty; the checked settings otherwise."""
        if not validation_enabled(config):
            return None
        interval = config.require("runner.valid_interval", int)
        if interval < 1:
            raise config.error("runner.valid_interval", f"must be at least 1, got {interval}")
        metric = config.require("runner.valid_metric", str)
        if not metric:
            raise config.error("runner.valid_metric", "must name a validation result, e.g. acc")
        mode = config.require("runner.valid_mode", str)
        if mode not in MODES:
            raise config.error("runner.valid_mode", f"expected one of {', '.join(MODES)}, got {mode!r}")
        view = validation_config(config)
        tasks = view.get("runner.infer_tasks")
        settings = {"valid_data_dir": config.resolve_path("runner.valid_data_dir"), "valid_tasks": tasks}
        selection = ModelSelection(os.path.join(save_dir, BEST_FILE), metric, mode, settings)
        return cls(view, interval, metric, mode, loader_batch_size(view, "valid", world_size), selection)

    def due(self, epoch, epochs) -> bool:
        return (epoch + 1) % self.interval == 0 or epoch == epochs - 1

    def best_text(self) -> str:
        best = self.selection.best
        if best is None:
            return f"none (no finite validation {self.metric})"
        return f"{best['epoch']} by validation {self.metric} ({self.mode}): {format_results(best['values'])}"


def remove_file(path):
    try:
        os.remove(path)
    except OSError as reason:
        raise UserError(f"{path}: cannot remove: {reason.strerror}") from None


def prepare_selection(validation, save_dir, start_epoch, resumed, is_main):
    """Bring best.json in line with this run (rank 0 only writes).

    A fresh start removes the best.json of an earlier run in the same folder
    (its checkpoints are overwritten now); a resumed run keeps the results of
    the epochs before start_epoch. Returns the selection to continue (None
    without validation).
    """
    path = os.path.join(save_dir, BEST_FILE)
    if not is_main:
        return validation and validation.selection
    if not resumed:
        if os.path.isfile(path):
            remove_file(path)
            log(f"removed {path} of an earlier run (a fresh start overwrites its checkpoints)")
        return validation and validation.selection
    if validation is None:
        selection, notes, warnings = ModelSelection.resume(path, None, None, None, start_epoch)
    else:
        old = validation.selection
        selection, notes, warnings = ModelSelection.resume(path, old.metric, old.mode, old.settings, start_epoch)
    for line in notes:
        log(line)
    for line in warnings:
        warn(line)
    if os.path.isfile(path) and notes:  # results of epochs that are trained again were dropped, or re-selected
        if selection.history:
            selection.save()
        else:
            remove_file(path)
    if selection.best is not None:
        log(f"best epoch so far (from {path}): {selection.best['epoch']}, "
            f"{format_results({selection.metric: selection.best_value})}")
    return selection if validation is not None else None


def validate(run, validation, epoch, folder):
    """Evaluate the model after `epoch` on the validation data; log, record, and keep the best."""
    parallel = run.parallel
    start = time.perf_counter()
    loader = evaluation_loader(validation.config, "valid", parallel.rank, parallel.world_size, run.seed)
    values, batches, samples = evaluate(run.model_obj, run.model, validation.config, epoch, loader, parallel,
                                        validation.batch_size, name="valid")
    # Evaluation may leave gradients (MAML adapts with them); the next epoch starts clean.
    run.optimizer.clear_grad()
    seconds = time.perf_counter() - start
    selection = validation.selection
    is_best = selection.add(epoch, folder, values)
    if is_best:
        verdict = "new best"
    elif selection.best is not None:
        verdict = f"best is epoch {selection.best['epoch']} ({format_results({validation.metric: selection.best_value})})"
    else:
        verdict = f"no best yet (no finite {validation.metric})"
    log(f"valid epoch {epoch}: {format_results(values)}; {verdict}")
    best_epoch = selection.best["epoch"] if selection.best is not None else None
    run.metrics_log.write("valid", {"epoch": epoch, "step": run.step, "checkpoint": folder},
                          {**values, "batches": batches, "samples": samples, "seconds": round(seconds, 3),
                           "best_epoch": best_epoch})
    if validation.metric not in values:
        raise run.config.error("runner.valid_metric", f"{validation.metric!r} is not among the validation results "
                               f"({', '.join(values) or 'none'}); the checkpoint of epoch {epoch} is saved, resume "
                               "with -o runner.resume_path=auto and another runner.valid_metric")
    if parallel.is_main:
        selection.save()


def train(args):
    config, plugin_module = load_run_config(args.config, args.overrides)
    epochs = config.require("runner.epochs", int)
    if epochs < 1:
        raise config.error("runner.epochs", f"must be at least 1, got {epochs}")
    print_interval = config.require("runner.print_interval", int)
    if print_interval < 1:
        raise config.error("runner.print_interval", f"must be at least 1, got {print_interval}")
    save_dir = config.resolve_path("runner.model_save_path")
    metrics_path = config.resolve_path("runner.metrics_path", required=False) or os.path.join(save_dir, "metrics.jsonl")
    seed = config.require("runner.seed", int)

    device = select_device(config)
    parallel = setup_data_parallel(config, device)
    rank, world_size = parallel.rank, parallel.world_size
    overwrite = config.require("runner.overwrite", bool)
    if parallel.is_main:  # the one writer holds the folder for its whole life (doc/reliability.md)
        lock_run_folder(save_dir)
        remove_stale_staging(save_dir)
    batch_size = loader_batch_size(config, "train", world_size)
    validation = Validation.from_config(config, save_dir, world_size)
    note = evaluation_note(plugin_module) if validation else None
    numeric_guard = NumericGuard(likely_causes(config, non_finite_keys(plugin_module)), warn)
    # Every rank seeds alike: identical initial parameters on all ranks.
    seed_everything(seed)
    model_obj = load_model_plugin(config)
    model = model_obj.create_model(config)
    optimizer = model_obj.create_optimizer(model, config)
    warm_path = warm_start_path_of(config)
    if warm_path is not None:
        warm_start(model, warm_path)
    init_path = resume_path_of(config, save_dir, parallel)
    # One run per folder: only a resume from the folder's own checkpoints continues in it; a warm start
    # (runner.model_init_path) begins a new run like a fresh start.
    if parallel.is_main and (init_path is None or os.path.dirname(init_path) != save_dir):
        replace_old_run(save_dir, overwrite)
    start_epoch, step = resume(config, model, optimizer, init_path)
    # Like paddle.DataParallel: start every rank from rank 0's parameters.
    parallel.broadcast_state(model, "sharing rank 0's parameters")
    if start_epoch >= epochs:
        warn(f"nothing to train: the run already reached runner.epochs={epochs} "
             f"(raise it with -o runner.epochs=N to train more)")
        return

    # The first loaders are built before anything is written, so a bad data
    # folder or reader fails without leaving a metrics file behind. (The
    # validation loader is only a check here: each validation builds its own.)
    if validation is not None:
        evaluation_loader(validation.config, "valid", rank, world_size, seed)
    seed_everything(epoch_seed(seed, start_epoch))
    loader = create_data_loader(config, "train", rank, world_size, epoch=start_epoch)
    visual = open_visual_log(config, "train", parallel.is_main)  # a missing visualdl stops the run here
    resumed = init_path is not None
    selection = prepare_selection(validation, save_dir, start_epoch, resumed, parallel.is_main)
    if validation is not None:
        validation.selection = selection
    # Only rank 0 writes the metrics file and the checkpoints.
    metrics_log = MetricsLog(metrics_path if parallel.is_main else None, append=resumed)
    metrics_log.write("start", {
        "config": os.path.abspath(config.path), "overrides": list(args.overrides), "device": device,
        "threads": cpu_thread_count(config), "seed": seed, "start_epoch": start_epoch, "epochs": epochs,
        "step": step, "resumed_from": init_path, "warm_start_from": warm_path, "world_size": world_size,
        "environment": environment_snapshot()})
    run = TrainingRun(model_obj, model, optimizer, config, metrics_log, print_interval, batch_size, step, parallel,
                      seed, numeric_guard, visual)
    ranks = f", {world_size} data-parallel ranks of {batch_size} samples per batch" if parallel.enabled else ""
    log(f"training {config.path} on {device} ({cpu_thread_count(config)} CPU threads{ranks}), "
        f"epochs {start_epoch}-{epochs - 1}, seed {seed}")
    if validation is not None:
        every = "every epoch" if validation.interval == 1 else f"every {validation.interval} epochs and the last"
        log(f"validation: {validation.config.resolve_path('runner.test_data_dir')}, {every}; "
            f"best epoch by {validation.metric} ({validation.mode}) in {validation.selection.path}")
    run_start = time.perf_counter()
    summary = {}
    with metrics_log, visual or contextlib.nullcontext():
        for epoch in range(start_epoch, epochs):
            if epoch != start_epoch:
                seed_everything(epoch_seed(seed, epoch))
                loader = create_data_loader(config, "train", rank, world_size, epoch=epoch)
            summary, batches, samples, seconds = run_epoch(run, epoch, loader)
            folder = os.path.join(save_dir, str(epoch))
            run.numeric_guard.check_parameters(model, epoch)  # every rank: they hold the same parameters
            if parallel.is_main:  # all ranks hold the same parameters
                folder = save_checkpoint(model, optimizer, save_dir, epoch,
                                         extra={"step": run.step, "metrics": summary})
            counts = {key: value for key, value in (("batches", batches), ("samples", samples)) if key not in summary}
            log(f"epoch: {epoch} done, {format_values({**summary, **counts})}, "
                f"epoch time: {seconds:.2f} s, checkpoint: {folder}")
            metrics_log.write("epoch", {"epoch": epoch, "step": run.step, "batches": batches,
                                        "samples": samples, "seconds": round(seconds, 3)},
                              {**summary, "checkpoint": folder})
            if validation is not None and validation.due(epoch, epochs):
                validate(run, validation, epoch, folder)
    total = time.perf_counter() - run_start
    log(f"training done: epochs {start_epoch}-{epochs - 1} ({epochs - start_epoch} run) in {total:.1f} s on {device}")
    log(f"last epoch: {format_values(summary)}")
    if validation is not None:
        log(f"best epoch: {validation.best_text()}; {validation.selection.path}")
        if note:
            log(f"evaluation: {note}")
    log(f"checkpoints: {os.path.join(save_dir, '<epoch>')} (rec.pdparams, rec.pdopt); metrics: {metrics_path}")


def main(argv=None) -> int:
    args = config_arg_parser("Train the model plugin next to a PaddleRec-style config.").parse_args(argv)
    return run_tool(train, args)


if __name__ == "__main__":
    sys.exit(main())

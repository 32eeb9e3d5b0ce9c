"""Train a PaddleRec-style model plugin (doc/tools.md).

    python tools/trainer.py -m models/<...>/config.yaml [-o key=value ...]
    python -m paddle.distributed.launch --nproc_per_node N tools/trainer.py -m <config> -o runner.use_fleet=True

The loop is PaddleRec's: the plugin (dygraph_model.py next to the config) builds the model, optimizer and
metrics and computes the loss; this tool owns epochs, checkpoints, logs, the metrics file and validation, and
knows no model. Data-parallel ranks train on their shares of every batch and take the same averaged step;
rank 0 writes.
"""
import contextlib
import os
import sys
import time
from dataclasses import dataclass

if not __package__:  # run as a script, not imported as tools.<name>
    import _repo_path  # noqa: F401  (puts the repository root, not tools/, on sys.path)

# None of these import paddle at import time: cli.load_run_config prepares the environment first.
from tools.utils.checkpoint import (latest_checkpoint, load_checkpoint, lock_run_folder, read_checkpoint_meta,  # noqa: E402
                                    remove_stale_staging, replace_old_run, save_checkpoint)
from tools.utils.cli import config_arg_parser, load_run_config, run_tool  # noqa: E402
from tools.utils.console import UserError, format_results, format_values, log, progress_bar, warn  # noqa: E402
from tools.utils.data import batches_then_none, count_samples, create_data_loader, expected_batches  # noqa: E402
from tools.utils.data import loader_batch_size  # noqa: E402
from tools.utils.distributed import Ranks, setup_data_parallel  # noqa: E402
from tools.utils.environment import cpu_thread_count, environment_snapshot, epoch_seed, seed_everything, select_device  # noqa: E402
from tools.utils.evaluation import BEST_FILE, MODES, ModelSelection, evaluate, evaluation_loader, validation_config  # noqa: E402
from tools.utils.metrics import MetricsLog, NumericGuard, likely_causes, open_visual_log, scalar_dict  # noqa: E402
from tools.utils.plugin import load_model_plugin, plugin_declaration  # noqa: E402

AUTO_RESUME = "auto"
INTERVAL_SUMS = ("loss", "batches", "samples", "reader", "batch")  # summed over the batches since the last log line


def learning_rate_scheduler(optimizer):
    """The optimizer's LRScheduler (Paddle has no public accessor), or None for a fixed learning rate."""
    import paddle

    learning_rate = getattr(optimizer, "_learning_rate", None)
    return learning_rate if isinstance(learning_rate, paddle.optimizer.lr.LRScheduler) else None


def load_starting_point(config, save_dir, parallel, model, optimizer):
    """Load what the run starts from; return (warm start folder, resumed folder, first epoch, global step).

    runner.model_init_path is PaddleRec's warm start: parameters only, from epoch 0 with a fresh optimizer.
    runner.resume_path continues a run from a checkpoint folder, or with "auto" from the newest one in
    runner.model_save_path (a fresh start when there is none; all ranks must find the same).
    """
    warm_path = config.resolve_path("runner.model_init_path", required=False)
    if warm_path is not None:
        if config.get("runner.resume_path"):
            raise config.error("runner.model_init_path", "set either it (warm start: parameters only, from epoch 0) "
                               "or runner.resume_path (continue a run), not both")
        if not os.path.isdir(warm_path):
            auto = config.get("runner.model_init_path") == AUTO_RESUME
            hint = " (to continue a run use runner.resume_path=auto)" if auto else ""
            raise config.error("runner.model_init_path", f"checkpoint folder {warm_path} not found{hint}")
        load_checkpoint(warm_path, model)
        log(f"warm start: parameters from {warm_path}; training starts at epoch 0 with a fresh optimizer")
    if config.get("runner.resume_path") == AUTO_RESUME:
        path = latest_checkpoint(save_dir)
        parallel.check_same(path and os.path.basename(path),  # by name: the absolute paths may differ between hosts
                            f"the newest checkpoint in {save_dir} (runner.resume_path=auto; it must be a shared folder)")
        if path is None:
            log(f"runner.resume_path=auto: no checkpoint in {save_dir}; starting fresh")
    else:
        path = config.resolve_path("runner.resume_path", required=False)
    if path is None:
        return warm_path, None, 0, 0
    if not os.path.isdir(path):
        raise config.error("runner.resume_path", f"checkpoint folder {path} not found")
    epoch = load_checkpoint(path, model, optimizer)
    scheduler = learning_rate_scheduler(optimizer)
    if scheduler is not None:  # the rate at the saved step under this run's settings (more epochs stretch it)
        scheduler.step(scheduler.last_epoch)
    step = int(read_checkpoint_meta(path).get("extra", {}).get("step", 0))
    log(f"loaded {path} (epoch unknown); training starts at epoch 0" if epoch is None else
        f"resumed from {path}: continuing at epoch {epoch + 1}")
    return warm_path, path, 0 if epoch is None else epoch + 1, step


@dataclass
class TrainingRun:
    """What every epoch of one training run needs."""
    model_obj: object
    model: object
    optimizer: object
    config: dict
    parallel: Ranks
    metrics_log: MetricsLog
    numeric_guard: NumericGuard  # stops the run at a NaN or infinite loss, gradient or parameter
    visual: object  # a metrics.VisualLog, or None
    step: int  # global batch count, continued across a resume


def log_interval(run, epoch, batch_id, sums, values, learning_rate):
    """PaddleRec's training line (values and speed since the last one), a "train" record and VisualDL scalars."""
    batches = sums["batches"]
    values = {"loss": sums["loss"] / batches, **values}
    speed = {"reader_cost": sums["reader"] / batches, "batch_cost": sums["batch"] / batches,
             "avg_samples": sums["samples"] / batches, "ips": sums["samples"] / sums["batch"] if sums["batch"] else 0.0}
    log(f"epoch: {epoch}, batch_id: {batch_id}, {format_values(values)}, "
        f"avg_reader_cost: {speed['reader_cost']:.5f} sec, avg_batch_cost: {speed['batch_cost']:.5f} sec, "
        f"avg_samples: {speed['avg_samples']:.1f}, ips: {speed['ips']:.1f} ins/s")
    run.metrics_log.write("train", {"epoch": epoch, "batch": batch_id, "step": run.step, "lr": learning_rate},
                          {**values, **speed})
    if run.visual is not None:
        run.visual.add(values, run.step)


def run_epoch(run, epoch, loader):
    """Train one epoch; return (summary values, batches, samples, seconds). Data-parallel ranks go through this
    loop in step: one gradient all-reduce per batch (which also tells when all ranks are out of batches; a rank
    without one still steps), and metric merges at the log lines and at the end."""
    model_obj, model, optimizer, parallel = run.model_obj, run.model, run.optimizer, run.parallel
    parallel.barrier(f"epoch {epoch}: start")  # ranks may arrive far apart (data building, rank 0 saving)
    model.train()
    if hasattr(model_obj, "set_epoch"):  # optional plugin hook, for training that changes with the epoch
        model_obj.set_epoch(epoch)
    metrics, names = model_obj.create_metrics()
    scheduler = learning_rate_scheduler(optimizer)
    totals, sums = {"loss": 0.0, "batches": 0, "samples": 0}, dict.fromkeys(INTERVAL_SUMS, 0.0)
    epoch_start = batch_start = time.perf_counter()
    bar = progress_bar(expected_batches(loader), f"epoch {epoch}")
    for batch_id, batch in enumerate(batches_then_none(loader)):
        sums["reader"] += time.perf_counter() - batch_start
        loss, own_samples, print_dict = None, 0, {}
        if batch is not None:
            loss, metrics, print_dict = model_obj.train_forward(model, metrics, batch, run.config)
            loss.backward()
            own_samples = count_samples(batch, loader.batch_size)
        # Every rank's .grad becomes the sample-weighted mean over the ranks, so all take the same step.
        active, samples, loss_value = parallel.sync_gradients(
            model.parameters(), own_samples, loss, f"epoch {epoch}, batch {batch_id}: gradient all-reduce")
        if not active:
            break  # every rank is out of batches
        run.numeric_guard.check_batch(loss_value, model, epoch, batch_id)  # before the update spreads it
        learning_rate = optimizer.get_lr()  # the rate this batch's update uses
        optimizer.step()
        optimizer.clear_grad()
        if scheduler is not None:
            scheduler.step()
        run.step += 1
        for key, value in (("loss", loss_value), ("batches", 1), ("samples", samples)):
            totals[key] += value
            sums[key] += value
        sums["batch"] += time.perf_counter() - batch_start
        if batch_id % run.config["runner.print_interval"] == 0:
            shown = {key: value for key, value in scalar_dict(print_dict).items() if key != "loss"}
            shown, metric_values = parallel.merged_results(
                metrics, names, model_obj.create_metrics, f"epoch {epoch}, batch {batch_id}: merging metrics",
                shown, own_samples)
            log_interval(run, epoch, batch_id, sums, {**shown, **metric_values}, learning_rate)
            sums = dict.fromkeys(INTERVAL_SUMS, 0.0)
        bar.update(1)
        batch_start = time.perf_counter()
    bar.close()
    summary = {"loss": totals["loss"] / max(totals["batches"], 1)}
    if totals["batches"]:
        summary.update(parallel.merged_results(metrics, names, model_obj.create_metrics,
                                               f"epoch {epoch}: merging metrics")[1])
    else:
        warn(f"epoch {epoch}: the training loader gave no batches")
    return summary, totals["batches"], totals["samples"], time.perf_counter() - epoch_start


class Validation:
    """runner.valid_*: which epochs are validated, on what, and the best epoch so far (best.json)."""

    def __init__(self, config, save_dir, world_size):
        self.config = validation_config(config)  # the view the reader and the plugin see
        self.interval = config.require("runner.valid_interval", int, minimum=1)
        metric, mode = config.require("runner.valid_metric", str), config.require("runner.valid_mode", str)
        if not metric:
            raise config.error("runner.valid_metric", "must name a validation result, e.g. acc")
        if mode not in MODES:
            raise config.error("runner.valid_mode", f"expected one of {', '.join(MODES)}, got {mode!r}")
        loader_batch_size(self.config, "valid", world_size)  # checked before training
        settings = {"valid_data_dir": config.resolve_path("runner.valid_data_dir"),
                    "valid_tasks": self.config.get("runner.infer_tasks")}
        self.selection = ModelSelection(os.path.join(save_dir, BEST_FILE), metric, mode, settings)

    def due(self, epoch, epochs) -> bool:
        return (epoch + 1) % self.interval == 0 or epoch == epochs - 1

    def best_text(self) -> str:
        best, selection = self.selection.best, self.selection
        if best is None:
            return f"none (no finite validation {selection.metric})"
        return f"{best['epoch']} by validation {selection.metric} ({selection.mode}): {format_results(best['values'])}"

    def validate(self, run, epoch, folder):
        """Evaluate the model after `epoch` on the validation data; log, record, and keep the best."""
        start, selection = time.perf_counter(), self.selection
        loader = evaluation_loader(self.config, "valid", run.parallel, run.config["runner.seed"])
        values, batches, samples = evaluate(run.model_obj, run.model, self.config, epoch, loader, run.parallel, "valid")
        run.optimizer.clear_grad()  # evaluation may leave gradients (MAML adapts with them)
        if selection.add(epoch, folder, values):
            verdict = "new best"
        elif selection.best is not None:
            verdict = (f"best is epoch {selection.best['epoch']} "
                       f"({format_results({selection.metric: selection.best_value})})")
        else:
            verdict = f"no best yet (no finite {selection.metric})"
        log(f"valid epoch {epoch}: {format_results(values)}; {verdict}")
        run.metrics_log.write("valid", {"epoch": epoch, "step": run.step, "checkpoint": folder}, {
            **values, "batches": batches, "samples": samples, "seconds": round(time.perf_counter() - start, 3),
            "best_epoch": selection.best and selection.best["epoch"]})
        if selection.metric not in values:
            raise run.config.error("runner.valid_metric", f"{selection.metric!r} is not among the validation results "
                                   f"({', '.join(values) or 'none'}); the checkpoint of epoch {epoch} is saved, "
                                   "resume with -o runner.resume_path=auto and another runner.valid_metric")
        if run.parallel.is_main:
            selection.save()


def remove_file(path):
    try:
        os.remove(path)
    except OSError as reason:
        raise UserError(f"{path}: cannot remove: {reason.strerror}") from None


def carry_over_best(validation, save_dir, start_epoch, resumed, is_main):
    """Bring best.json in line with this run (rank 0 writes): a fresh start removes an earlier run's; a resumed
    run keeps the results of the epochs before start_epoch, selected again (with or without validation now)."""
    path = os.path.join(save_dir, BEST_FILE)
    if not is_main or not os.path.isfile(path):
        return
    if not resumed:
        remove_file(path)
        log(f"removed {path} of an earlier run (a fresh start overwrites its checkpoints)")
        return
    old = validation and validation.selection
    selection, notes, warnings = ModelSelection.resume(path, old and old.metric, old and old.mode,
                                                       old and old.settings, start_epoch)
    for line in notes:
        log(line)
    for line in warnings:
        warn(line)
    if notes and selection.history:  # results of epochs that are trained again were dropped, or selected again
        selection.save()
    elif notes:
        remove_file(path)
    if selection.best is not None:
        log(f"best epoch so far (from {path}): {selection.best['epoch']}, "
            f"{format_results({selection.metric: selection.best_value})}")
    if validation is not None:
        validation.selection = selection


def train(args):
    config, plugin_module = load_run_config(args.config, args.overrides)
    epochs = config.require("runner.epochs", int, minimum=1)
    config.require("runner.print_interval", int, minimum=1)
    save_dir = config.resolve_path("runner.model_save_path")
    metrics_path = config.resolve_path("runner.metrics_path", required=False) or os.path.join(save_dir, "metrics.jsonl")
    seed = config.require("runner.seed", int)
    device = select_device(config)
    parallel = setup_data_parallel(config, device)
    overwrite = config.require("runner.overwrite", bool)
    if parallel.is_main:  # the one writer holds the folder for its whole life (doc/reliability.md)
        lock_run_folder(save_dir)
        remove_stale_staging(save_dir)
    batch_size = loader_batch_size(config, "train", parallel.world_size)
    validation = Validation(config, save_dir, parallel.world_size) if config.get("runner.valid_data_dir") else None
    note = " ".join(plugin_declaration(plugin_module, "EVALUATION_NOTE").split())
    numeric_guard = NumericGuard(likely_causes(config, plugin_declaration(plugin_module, "NON_FINITE_KEYS")), warn)
    seed_everything(seed)  # every rank alike: the same initial parameters
    model_obj = load_model_plugin(config)
    model = model_obj.create_model(config)
    optimizer = model_obj.create_optimizer(model, config)
    warm_path, init_path, start_epoch, step = load_starting_point(config, save_dir, parallel, model, optimizer)
    # One run per folder: only a resume from the folder's own checkpoints continues in it.
    if parallel.is_main and (init_path is None or os.path.dirname(init_path) != save_dir):
        replace_old_run(save_dir, overwrite)
    parallel.broadcast_state(model, "sharing rank 0's parameters")  # as paddle.DataParallel does
    if start_epoch >= epochs:
        warn(f"nothing to train: the run already reached runner.epochs={epochs} "
             f"(raise it with -o runner.epochs=N to train more)")
        return
    # The first loaders are built before anything is written, so a bad data folder or reader fails without
    # leaving a metrics file behind (each validation builds its own loader).
    if validation is not None:
        evaluation_loader(validation.config, "valid", parallel, seed)
    seed_everything(epoch_seed(seed, start_epoch))
    loader = create_data_loader(config, "train", parallel.rank, parallel.world_size, epoch=start_epoch)
    visual = open_visual_log(config, "train", parallel.is_main)  # a missing visualdl stops the run here
    carry_over_best(validation, save_dir, start_epoch, init_path is not None, parallel.is_main)
    metrics_log = MetricsLog(metrics_path if parallel.is_main else None, append=init_path is not None)
    threads = cpu_thread_count(config)
    metrics_log.write("start", {
        "config": os.path.abspath(config.path), "overrides": list(args.overrides), "device": device,
        "threads": threads, "seed": seed, "start_epoch": start_epoch, "epochs": epochs, "step": step,
        "resumed_from": init_path, "warm_start_from": warm_path, "world_size": parallel.world_size,
        "environment": environment_snapshot()})
    run = TrainingRun(model_obj, model, optimizer, config, parallel, metrics_log, numeric_guard, visual, step)
    ranks = f", {parallel.world_size} data-parallel ranks of {batch_size} samples per batch" if parallel.enabled else ""
    log(f"training {config.path} on {device} ({threads} CPU threads{ranks}), epochs {start_epoch}-{epochs - 1}, "
        f"seed {seed}")
    if validation is not None:
        every = "every epoch" if validation.interval == 1 else f"every {validation.interval} epochs and the last"
        log(f"validation: {validation.config.resolve_path('runner.test_data_dir')}, {every}; best epoch by "
            f"{validation.selection.metric} ({validation.selection.mode}) in {validation.selection.path}")
    run_start, summary = time.perf_counter(), {}
    with metrics_log, visual or contextlib.nullcontext():
        for epoch in range(start_epoch, epochs):
            if epoch != start_epoch:
                seed_everything(epoch_seed(seed, epoch))
                loader = create_data_loader(config, "train", parallel.rank, parallel.world_size, epoch=epoch)
            summary, batches, samples, seconds = run_epoch(run, epoch, loader)
            folder = os.path.join(save_dir, str(epoch))
            run.numeric_guard.check_parameters(model, epoch)  # every rank: they hold the same parameters
            if parallel.is_main:
                folder = save_checkpoint(model, optimizer, save_dir, epoch, extra={"step": run.step, "metrics": summary})
            counts = {key: value for key, value in (("batches", batches), ("samples", samples)) if key not in summary}
            log(f"epoch: {epoch} done, {format_values({**summary, **counts})}, epoch time: {seconds:.2f} s, "
                f"checkpoint: {folder}")
            metrics_log.write("epoch", {"epoch": epoch, "step": run.step, "batches": batches, "samples": samples,
                                        "seconds": round(seconds, 3)}, {**summary, "checkpoint": folder})
            if validation is not None and validation.due(epoch, epochs):
                validation.validate(run, epoch, folder)
    log(f"training done: epochs {start_epoch}-{epochs - 1} ({epochs - start_epoch} run) in "
        f"{time.perf_counter() - run_start:.1f} s on {device}")
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

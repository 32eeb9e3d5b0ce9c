"""Train a PaddleRec-style model plugin (doc/tools.md).

    python tools/trainer.py -m models/<...>/config.yaml [-o key=value ...]
    python -m paddle.distributed.launch --nproc_per_node N tools/trainer.py -m <config> -o runner.use_fleet=True

The loop is PaddleRec's: the plugin builds the model, optimizer and metrics and computes the loss; this tool owns
epochs, checkpoints, logs, the metrics file and validation. Data-parallel ranks train on their shares of every
batch and take the same averaged step; rank 0 writes.
"""
import contextlib
import os
import sys
import time

if not __package__:  # run as a script, not imported as tools.<name>
    import _repo_path  # noqa: F401  (puts the repository root, not tools/, on sys.path)

# None of these import paddle at import time: environment.load_run_config prepares the environment first.
from tools.utils.checkpoint import (check_epoch_folders, check_output_file, file_in_the_way,  # noqa: E402
                                    latest_checkpoint, load_checkpoint, lock_run_folder, read_checkpoint_meta,
                                    replace_old_run, save_checkpoint)
from tools.utils.console import UserError, config_arg_parser, format_results, format_values, log, progress_bar  # noqa
from tools.utils.console import run_tool, warn  # noqa: E402
from tools.utils.distributed import setup_data_parallel  # noqa: E402
from tools.utils.environment import cpu_thread_count, environment_snapshot, epoch_seed, seed_everything  # noqa: E402
from tools.utils.environment import load_run_config, select_device  # noqa: E402
from tools.utils.evaluation import BEST_FILE, ModelSelection, evaluate, evaluation_loader, validation_config  # noqa
from tools.utils.metrics import MetricsLog, NumericGuard, VisualLog, likely_causes, scalar_dict  # noqa: E402
from tools.utils.plugin import (batches_then_none, count_samples, create_data_loader, evaluation_note,  # noqa: E402
                                expected_batches, load_model_plugin, loader_batch_size, plugin_declaration,
                                recorded_settings)

AUTO_RESUME = "auto"
INTERVAL_SUMS = ("loss", "batches", "samples", "reader", "batch")  # summed over the batches since the last log line


def learning_rate_scheduler(optimizer):
    """The optimizer's LRScheduler (Paddle has no public accessor), or None for a fixed learning rate."""
    import paddle

    learning_rate = getattr(optimizer, "_learning_rate", None)
    return learning_rate if isinstance(learning_rate, paddle.optimizer.lr.LRScheduler) else None


class Trainer:
    """One training run: set up in __init__ (everything checked before anything is written), then fit()."""

    def __init__(self, args):
        config, plugin_module = load_run_config(args.config, args.overrides, data_parallel=True)
        self.config, self.overrides = config, args.overrides
        self.epochs, self.seed = config["runner.epochs"], config["runner.seed"]
        self.save_dir = config.resolve_path("runner.model_save_path")
        self.metrics_path = (config.resolve_path("runner.metrics_path", required=False)
                             or os.path.join(self.save_dir, "metrics.jsonl"))
        self.device = select_device(config)
        self.parallel = parallel = setup_data_parallel(config, self.device)
        in_the_way = file_in_the_way(self.save_dir)
        if in_the_way:
            raise config.error("runner.model_save_path", f"{in_the_way} is a file, not a folder")
        if parallel.is_main:  # the one writer holds the folder for its whole life (doc/reliability.md)
            lock_run_folder(self.save_dir)
        self.batch_size = loader_batch_size(config, "train", parallel.world_size)
        self.valid_config = self.selection = None
        if config["runner.valid_data_dir"]:  # runner.valid_*: the reader and the plugin see the view
            self.valid_config = validation_config(config)
            if not config["runner.valid_metric"]:
                raise config.error("runner.valid_metric", "must name a validation result, e.g. acc")
            loader_batch_size(self.valid_config, "valid", parallel.world_size)  # checked before training
            settings = {"valid_data_dir": config.resolve_path("runner.valid_data_dir"),
                        "valid_tasks": self.valid_config.get("runner.infer_tasks")}
            self.selection = ModelSelection(os.path.join(self.save_dir, BEST_FILE), config["runner.valid_metric"],
                                            config["runner.valid_mode"], settings)
        self.note = evaluation_note(plugin_module, config)
        self.recorded = recorded_settings(config)  # written into every checkpoint, compared on loading one
        causes = likely_causes(config, plugin_declaration(plugin_module, "NON_FINITE_KEYS"))
        self.numeric_guard = NumericGuard(causes, warn)  # stops the run at a NaN or infinite number
        seed_everything(self.seed)  # every rank alike: the same initial parameters
        self.model_obj = load_model_plugin(config)
        self.model = self.model_obj.create_model(config)
        self.optimizer = self.model_obj.create_optimizer(self.model, config)
        self.load_starting_point()
        if parallel.is_main:
            self.check_outputs(config["runner.overwrite"])
        parallel.broadcast_state(self.model, "sharing rank 0's parameters")

    def load_starting_point(self):
        """Warm start (runner.model_init_path: parameters only) or resume (runner.resume_path, "auto": the newest)."""
        config, save_dir = self.config, self.save_dir
        self.warm_from = config.resolve_path("runner.model_init_path", required=False)
        if self.warm_from is not None:
            if config.get("runner.resume_path"):
                raise config.error("runner.model_init_path", "set either it (warm start: parameters only, from "
                                   "epoch 0) or runner.resume_path (continue a run), not both")
            if not os.path.isdir(self.warm_from):
                auto = config["runner.model_init_path"] == AUTO_RESUME
                hint = " (to continue a run use runner.resume_path=auto)" if auto else ""
                raise config.error("runner.model_init_path", f"checkpoint folder {self.warm_from} not found{hint}")
            load_checkpoint(self.warm_from, self.model, settings=self.recorded)
            log(f"warm start: parameters from {self.warm_from}; training starts at epoch 0 with a fresh optimizer")
        if config.get("runner.resume_path") == AUTO_RESUME:
            path = latest_checkpoint(save_dir)
            self.parallel.check_same(path and os.path.basename(path),  # by name: paths may differ between hosts
                                     f"the newest checkpoint in {save_dir} (runner.resume_path=auto; it must be a "
                                     "shared folder)")
            if path is None:
                log(f"runner.resume_path=auto: no checkpoint in {save_dir}; starting fresh")
        else:
            path = config.resolve_path("runner.resume_path", required=False)
        self.resumed_from, self.start_epoch, self.step = path, 0, 0
        if path is None:
            return
        if not os.path.isdir(path):
            raise config.error("runner.resume_path", f"checkpoint folder {path} not found")
        epoch = load_checkpoint(path, self.model, self.optimizer, self.recorded)
        scheduler = learning_rate_scheduler(self.optimizer)
        if scheduler is not None:  # the rate at the saved step under this run's settings (more epochs stretch it)
            scheduler.step(scheduler.last_epoch)
        self.step = int(read_checkpoint_meta(path).get("extra", {}).get("step", 0))
        self.start_epoch = 0 if epoch is None else epoch + 1
        log(f"loaded {path} (epoch unknown); training starts at epoch 0" if epoch is None else
            f"resumed from {path}: continuing at epoch {epoch + 1}")

    def check_outputs(self, overwrite):
        """A run owns only what it writes: before anything is written, refuse an output that would replace what
        another run or the user keeps there; one run per folder, so a fresh start replaces the old run as a whole."""
        check_epoch_folders(self.save_dir, range(self.start_epoch, self.epochs))
        check_output_file(os.path.join(self.save_dir, BEST_FILE), "best.json")
        check_output_file(self.metrics_path, "metrics", "runner.metrics_path")
        own = os.path.join(self.save_dir, "metrics.jsonl")  # the folder's own: replace_old_run decides about it
        if (self.resumed_from is None and not overwrite and os.path.abspath(self.metrics_path) != own
                and os.path.isfile(self.metrics_path) and os.path.getsize(self.metrics_path) > 0):
            raise self.config.error("runner.metrics_path", f"{self.metrics_path} holds the metrics of another run; "
                                    "choose another path, or replace it with runner.overwrite=True")
        if self.resumed_from is None or os.path.dirname(self.resumed_from) != self.save_dir:
            replace_old_run(self.save_dir, overwrite)

    def carry_over_best(self):
        """best.json in line with this run (rank 0): a fresh start removes an earlier run's; a resumed run keeps the
        results of the epochs before its first, selected again."""
        path = os.path.join(self.save_dir, BEST_FILE)
        if not self.parallel.is_main or not os.path.isfile(path):
            return
        selection, changed = (ModelSelection.resume(path, self.selection, self.start_epoch) if self.resumed_from
                              else (None, True))
        if changed and selection and selection.history:  # results of epochs trained again dropped, or reselected
            selection.save()
        elif changed:
            try:
                os.remove(path)
            except OSError as reason:
                raise UserError(f"{path}: cannot remove: {reason.strerror}") from None
            if selection is None:
                log(f"removed {path} of an earlier run (a fresh start overwrites its checkpoints)")
                return
        if selection.best is not None:
            log(f"best epoch so far (from {path}): {selection.best['epoch']}, "
                f"{format_results({selection.metric: selection.best_value})}")
        if self.selection is not None:
            self.selection = selection

    def log_interval(self, epoch, batch_id, sums, values, learning_rate):
        """PaddleRec's training line (values and speed since the last one), a "train" record, VisualDL scalars."""
        batches = sums["batches"]
        values = {"loss": sums["loss"] / batches, **values}
        speed = {"reader_cost": sums["reader"] / batches, "batch_cost": sums["batch"] / batches,
                 "avg_samples": sums["samples"] / batches,
                 "ips": sums["samples"] / sums["batch"] if sums["batch"] else 0.0}
        log(f"epoch: {epoch}, batch_id: {batch_id}, {format_values(values)}, "
            f"avg_reader_cost: {speed['reader_cost']:.5f} sec, avg_batch_cost: {speed['batch_cost']:.5f} sec, "
            f"avg_samples: {speed['avg_samples']:.1f}, ips: {speed['ips']:.1f} ins/s")
        self.metrics_log.write("train", {"epoch": epoch, "batch": batch_id, "step": self.step, "lr": learning_rate},
                               {**values, **speed})
        self.visual.add(values, self.step)

    def run_epoch(self, epoch, loader):
        """(summary values, batches, samples, seconds) of one epoch. Ranks go in step: one gradient all-reduce per
        batch, which also tells when all are out of batches (a rank without one still steps), and metric merges."""
        model_obj, model, optimizer, parallel = self.model_obj, self.model, self.optimizer, self.parallel
        parallel.barrier(f"epoch {epoch}: start")  # ranks may arrive far apart (data building, rank 0 saving)
        model.train()
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
                loss, metrics, print_dict = model_obj.train_forward(model, metrics, batch, self.config)
                loss.backward()
                own_samples = count_samples(batch, loader.batch_size)
            # Every rank's .grad becomes the sample-weighted mean over the ranks, so all take the same step.
            active, samples, loss_value = parallel.sync_gradients(
                model.parameters(), own_samples, loss, f"epoch {epoch}, batch {batch_id}: gradient all-reduce")
            if not active:
                break  # every rank is out of batches
            self.numeric_guard.check_batch(loss_value, model, epoch, batch_id)  # before the update spreads it
            learning_rate = optimizer.get_lr()  # the rate this batch's update uses
            optimizer.step()
            optimizer.clear_grad()
            if scheduler is not None:
                scheduler.step()
            self.step += 1
            for key, value in (("loss", loss_value), ("batches", 1), ("samples", samples)):
                totals[key] += value
                sums[key] += value
            sums["batch"] += time.perf_counter() - batch_start
            if batch_id % self.config["runner.print_interval"] == 0:
                shown = {key: value for key, value in scalar_dict(print_dict).items() if key != "loss"}
                shown, metric_values = parallel.merged_results(
                    metrics, names, model_obj.create_metrics, f"epoch {epoch}, batch {batch_id}: merging metrics",
                    shown, own_samples)
                self.log_interval(epoch, batch_id, sums, {**shown, **metric_values}, learning_rate)
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

    def validate(self, epoch, folder):
        """Evaluate the model after `epoch` on the validation data; log, record, and keep the best."""
        view, selection = self.valid_config, self.selection
        loader = evaluation_loader(view, "valid", self.parallel, self.seed)
        values, counts = evaluate(self.model_obj, self.model, view, epoch, loader, self.parallel, "valid")
        self.optimizer.clear_grad()  # evaluation may leave gradients (a model may adapt with them)
        if selection.add(epoch, folder, values):
            verdict = "new best"
        elif selection.best is not None:
            verdict = (f"best is epoch {selection.best['epoch']} "
                       f"({format_results({selection.metric: selection.best_value})})")
        else:
            verdict = f"no best yet (no finite {selection.metric})"
        log(f"valid epoch {epoch}: {format_results(values)}; {verdict}")
        self.metrics_log.write("valid", {"epoch": epoch, "step": self.step, "checkpoint": folder}, {
            **values, **counts, "best_epoch": selection.best and selection.best["epoch"]})
        if selection.metric not in values:
            raise self.config.error("runner.valid_metric", f"{selection.metric!r} is not among the validation "
                                    f"results ({', '.join(values) or 'none'}); the checkpoint of epoch {epoch} is "
                                    "saved, resume with -o runner.resume_path=auto and another runner.valid_metric")
        if self.parallel.is_main:
            selection.save()

    def fit(self):
        config, parallel, selection, seed = self.config, self.parallel, self.selection, self.seed
        start_epoch, epochs, save_dir = self.start_epoch, self.epochs, self.save_dir
        if start_epoch >= epochs:
            warn(f"nothing to train: the run already reached runner.epochs={epochs} "
                 f"(raise it with -o runner.epochs=N to train more)")
            return
        # The first loaders are built before anything is written, so a bad data folder or reader fails without
        # leaving a metrics file behind (each validation builds its own loader).
        if selection is not None:
            evaluation_loader(self.valid_config, "valid", parallel, seed)
        seed_everything(epoch_seed(seed, start_epoch))
        loader = create_data_loader(config, "train", parallel.rank, parallel.world_size, epoch=start_epoch)
        self.visual = VisualLog(config, "train", parallel.is_main)  # a missing visualdl stops the run here
        self.carry_over_best()
        self.metrics_log = MetricsLog(self.metrics_path if parallel.is_main else None,
                                      append=self.resumed_from is not None)
        threads = cpu_thread_count(config)
        self.metrics_log.write("start", {
            "config": os.path.abspath(config.path), "overrides": self.overrides, "device": self.device,
            "threads": threads, "seed": seed, "start_epoch": start_epoch, "epochs": epochs, "step": self.step,
            "resumed_from": self.resumed_from, "warm_start_from": self.warm_from, "world_size": parallel.world_size,
            "environment": environment_snapshot()})
        ranks = (f", {parallel.world_size} data-parallel ranks of {self.batch_size} samples per batch"
                 if parallel.enabled else "")
        log(f"training {config.path} on {self.device} ({threads} CPU threads{ranks}), epochs {start_epoch}-"
            f"{epochs - 1}, seed {seed}")
        interval = config["runner.valid_interval"]
        if selection is not None:
            every = "every epoch" if interval == 1 else f"every {interval} epochs and the last"
            log(f"validation: {self.valid_config.resolve_path('runner.test_data_dir')}, {every}; best epoch by "
                f"{selection.metric} ({selection.mode}) in {selection.path}")
        run_start, summary = time.perf_counter(), {}
        with contextlib.closing(self.metrics_log), contextlib.closing(self.visual):
            for epoch in range(start_epoch, epochs):
                if epoch != start_epoch:
                    seed_everything(epoch_seed(seed, epoch))
                    loader = create_data_loader(config, "train", parallel.rank, parallel.world_size, epoch=epoch)
                summary, batches, samples, seconds = self.run_epoch(epoch, loader)
                folder = os.path.join(save_dir, str(epoch))
                self.numeric_guard.check_parameters(self.model, epoch)  # every rank: they hold the same parameters
                if parallel.is_main:
                    folder = save_checkpoint(self.model, self.optimizer, save_dir, epoch,
                                             extra={"step": self.step, "metrics": summary,
                                                    "settings": self.recorded})
                counts = {key: value for key, value in (("batches", batches), ("samples", samples))
                          if key not in summary}
                log(f"epoch: {epoch} done, {format_values({**summary, **counts})}, epoch time: {seconds:.2f} s, "
                    f"checkpoint: {folder}")
                self.metrics_log.write("epoch", {"epoch": epoch, "step": self.step, "batches": batches,
                                                 "samples": samples, "seconds": round(seconds, 3)},
                                       {**summary, "checkpoint": folder})
                if selection is not None and ((epoch + 1) % interval == 0 or epoch == epochs - 1):
                    self.validate(epoch, folder)
        log(f"training done: epochs {start_epoch}-{epochs - 1} ({epochs - start_epoch} run) in "
            f"{time.perf_counter() - run_start:.1f} s on {self.device}")
        log(f"last epoch: {format_values(summary)}")
        if selection is not None:
            selection = self.selection  # carry_over_best may have replaced it
            best = (f"{selection.best['epoch']} by validation {selection.metric} ({selection.mode}): "
                    f"{format_results(selection.best['values'])}" if selection.best else
                    f"none (no finite validation {selection.metric})")
            log(f"best epoch: {best}; {selection.path}")
            if self.note:
                log(f"evaluation: {self.note}")
        log(f"checkpoints: {os.path.join(save_dir, '<epoch>')} (rec.pdparams, rec.pdopt); metrics: {self.metrics_path}")


def main(argv=None) -> int:
    args = config_arg_parser("Train the model plugin next to a PaddleRec-style config.").parse_args(argv)
    return run_tool(lambda parsed: Trainer(parsed).fit(), args)


if __name__ == "__main__":
    sys.exit(main())

"""Train a PaddleRec-style model plugin.

    python tools/trainer.py -m models/<...>/config.yaml [-o key=value ...]
    python -u ../../../tools/trainer.py -m config.yaml      (from a model folder)

The loop is PaddleRec's: the plugin (dygraph_model.py next to the config)
builds the model, optimizer and metrics and computes the loss; this tool
owns epochs, checkpoints, logging and the metrics file, and knows nothing
about any particular model.
"""
import os
import sys
import time
from dataclasses import dataclass


if not __package__:  # run as a script, not imported as tools.<name>
    import _repo_path  # noqa: F401  (puts the repository root, not tools/, on sys.path)

# None of these import paddle at import time: the environment must be
# prepared (startup.load_run_config) before Paddle starts.
from tools.utils.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint  # noqa: E402
from tools.utils.cli import config_arg_parser, run_tool  # noqa: E402
from tools.utils.console import format_train_line, format_values, log, progress_bar, warn  # noqa: E402
from tools.utils.data import count_samples, create_data_loader, expected_batches  # noqa: E402
from tools.utils.device import cpu_thread_count, select_device  # noqa: E402
from tools.utils.metric_values import metric_results, scalar_dict, to_scalar  # noqa: E402
from tools.utils.metrics_log import MetricsLog  # noqa: E402
from tools.utils.plugin import load_model_plugin  # noqa: E402
from tools.utils.runtime import environment_snapshot, epoch_seed, seed_everything  # noqa: E402
from tools.utils.startup import load_run_config  # noqa: E402
from tools.utils.timing import IntervalStats  # noqa: E402


def refuse_fleet(config):
    """runner.use_fleet must not silently train one independent model per rank."""
    if not config.get("runner.use_fleet"):
        return
    if "PADDLE_TRAINER_ID" in os.environ or "PADDLE_TRAINERS_NUM" in os.environ:
        raise config.error("runner.use_fleet", "data-parallel training is not implemented in this trainer yet "
                           "(gradients would not be averaged across ranks); set runner.use_fleet: False")
    raise config.error("runner.use_fleet", "True, but no distributed launcher started this process and "
                       "data-parallel training is not implemented yet; set runner.use_fleet: False")


def learning_rate_scheduler(optimizer):
    """The optimizer's LRScheduler, or None for a fixed learning rate."""
    import paddle

    # Paddle has no public accessor for the scheduler object itself.
    learning_rate = getattr(optimizer, "_learning_rate", None)
    if isinstance(learning_rate, paddle.optimizer.lr.LRScheduler):
        return learning_rate
    return None


def resume(config, model, optimizer):
    """Load runner.model_init_path if set; return (first epoch, global step)."""
    init_path = config.resolve_path("runner.model_init_path", required=False)
    if init_path is None:
        return 0, 0
    if not os.path.isdir(init_path):
        raise config.error("runner.model_init_path", f"checkpoint folder {init_path} not found")
    epoch = load_checkpoint(init_path, model, optimizer)
    step = read_checkpoint_meta(init_path).get("extra", {}).get("step", 0)
    if epoch is None:
        log(f"loaded {init_path} (epoch unknown); training starts at epoch 0")
        return 0, int(step)
    log(f"resumed from {init_path}: continuing at epoch {epoch + 1}")
    return epoch + 1, int(step)


def batch_values(loss_mean, print_dict, metrics, names):
    """Values for a log line: the loss, then print_dict, then metrics.

    The loss comes from the tensor train_forward returned (averaged over the
    interval), so a "loss" entry in print_dict is not repeated.
    """
    values = {"loss": loss_mean}
    values.update({key: value for key, value in scalar_dict(print_dict).items() if key != "loss"})
    values.update(metric_results(metrics, names))
    return values


@dataclass
class TrainingRun:
    """What every epoch of one training run needs."""
    model_obj: object
    model: object
    optimizer: object
    config: dict
    metrics_log: MetricsLog
    print_interval: int
    batch_size: int
    step: int  # global batch count, continued across a resume


def run_epoch(run, epoch, loader):
    """Train one epoch; return (summary values, batches, samples, seconds)."""
    model_obj, model, optimizer, config = run.model_obj, run.model, run.optimizer, run.config
    model.train()
    metrics, names = model_obj.create_metrics()
    scheduler = learning_rate_scheduler(optimizer)
    interval = IntervalStats()
    loss_sum, batches, samples = 0.0, 0, 0
    epoch_start = time.perf_counter()
    bar = progress_bar(expected_batches(loader), f"epoch {epoch}")
    batch_start = time.perf_counter()
    for batch_id, batch in enumerate(loader):
        reader_cost = time.perf_counter() - batch_start
        loss, metrics, print_dict = model_obj.train_forward(model, metrics, batch, config)
        loss.backward()
        # --- data-parallel hook -------------------------------------------
        # With runner.use_fleet, gradients will be averaged across ranks
        # here, between backward() and step(). Not implemented yet:
        # refuse_fleet() stops such runs before training starts.
        # -------------------------------------------------------------------
        learning_rate = optimizer.get_lr()  # the rate this batch's update uses
        optimizer.step()
        optimizer.clear_grad()
        if scheduler is not None:
            scheduler.step()
        loss_value = to_scalar(loss)
        batch_samples = count_samples(batch, run.batch_size)
        interval.add(reader_cost, time.perf_counter() - batch_start, batch_samples, loss_value)
        loss_sum += loss_value
        batches += 1
        samples += batch_samples
        run.step += 1
        if batch_id % run.print_interval == 0:
            values = batch_values(interval.mean_loss(), print_dict, metrics, names)
            speed = interval.averages()
            log(format_train_line(epoch, batch_id, values, **speed))
            run.metrics_log.write(
                "train", {"epoch": epoch, "batch": batch_id, "step": run.step, "lr": learning_rate},
                {**values, **speed})
            interval.reset()
        bar.update(1)
        batch_start = time.perf_counter()
    bar.close()
    if batches == 0:
        warn(f"epoch {epoch}: the training loader gave no batches")
    summary = {"loss": loss_sum / max(batches, 1)}
    summary.update(metric_results(metrics, names) if batches else {})
    return summary, batches, samples, time.perf_counter() - epoch_start


def train(args):
    config, _ = load_run_config(args.config, args.overrides)
    refuse_fleet(config)
    epochs = config.require("runner.epochs", int)
    print_interval = config.require("runner.print_interval", int)
    if print_interval < 1:
        raise config.error("runner.print_interval", f"must be at least 1, got {print_interval}")
    save_dir = config.resolve_path("runner.model_save_path")
    metrics_path = config.resolve_path("runner.metrics_path", required=False) or os.path.join(save_dir, "metrics.jsonl")
    seed = config.require("runner.seed", int)

    device = select_device(config)
    seed_everything(seed)
    model_obj = load_model_plugin(config)
    model = model_obj.create_model(config)
    optimizer = model_obj.create_optimizer(model, config)
    start_epoch, step = resume(config, model, optimizer)
    if start_epoch >= epochs:
        warn(f"nothing to train: the run already reached runner.epochs={epochs} "
             f"(raise it with -o runner.epochs=N to train more)")
        return

    # The first loader is built before anything is written, so a bad data
    # folder or reader fails without leaving a metrics file behind.
    seed_everything(epoch_seed(seed, start_epoch))
    loader = create_data_loader(config, "train", epoch=start_epoch)
    resumed = start_epoch > 0 or bool(config.get("runner.model_init_path"))
    metrics_log = MetricsLog(metrics_path, append=resumed)
    metrics_log.write("start", {
        "config": os.path.abspath(config.path), "overrides": list(args.overrides), "device": device,
        "threads": cpu_thread_count(config), "seed": seed, "start_epoch": start_epoch, "epochs": epochs,
        "step": step, "resumed_from": config.resolve_path("runner.model_init_path", required=False),
        "environment": environment_snapshot()})
    run = TrainingRun(model_obj, model, optimizer, config, metrics_log, print_interval,
                      config.require("runner.train_batch_size", int), step)
    log(f"training {config.path} on {device} ({cpu_thread_count(config)} CPU threads), "
        f"epochs {start_epoch}-{epochs - 1}, seed {seed}")
    run_start = time.perf_counter()
    summary = {}
    with metrics_log:
        for epoch in range(start_epoch, epochs):
            if epoch != start_epoch:
                seed_everything(epoch_seed(seed, epoch))
                loader = create_data_loader(config, "train", epoch=epoch)
            summary, batches, samples, seconds = run_epoch(run, epoch, loader)
            folder = save_checkpoint(model, optimizer, save_dir, epoch,
                                     extra={"step": run.step, "metrics": summary})
            counts = {key: value for key, value in (("batches", batches), ("samples", samples)) if key not in summary}
            log(f"epoch: {epoch} done, {format_values({**summary, **counts})}, "
                f"epoch time: {seconds:.2f} s, checkpoint: {folder}")
            metrics_log.write("epoch", {"epoch": epoch, "step": run.step, "batches": batches,
                                        "samples": samples, "seconds": round(seconds, 3)},
                              {**summary, "checkpoint": folder})
    total = time.perf_counter() - run_start
    log(f"training done: epochs {start_epoch}-{epochs - 1} ({epochs - start_epoch} run) in {total:.1f} s on {device}")
    log(f"last epoch: {format_values(summary)}")
    log(f"checkpoints: {os.path.join(save_dir, '<epoch>')} (rec.pdparams, rec.pdopt); metrics: {metrics_path}")


def main(argv=None) -> int:
    args = config_arg_parser("Train the model plugin next to a PaddleRec-style config.").parse_args(argv)
    return run_tool(train, args)


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate the per-epoch checkpoints of a model plugin.

    python tools/infer.py -m models/<...>/config.yaml [-o key=value ...]

For each epoch in range(runner.infer_start_epoch, runner.infer_end_epoch)
this loads <runner.infer_load_path>/<epoch>, runs the plugin's
infer_forward over the evaluation loader, prints one summary line and
appends an "infer" record to <runner.infer_load_path>/infer_metrics.jsonl.
The tool does not call model.eval(): the plugin picks its own mode (MAML
adapts with batch statistics at test time).

Data-parallel (doc/distributed.md):
    python -m paddle.distributed.launch --nproc_per_node N tools/infer.py -m <config> -o runner.use_fleet=True
Each rank evaluates its share of every batch; the metrics are merged over
all ranks (metric state()/merge_states()) and rank 0 reports.
"""
import os
import sys
import time


if not __package__:  # run as a script, not imported as tools.<name>
    import _repo_path  # noqa: F401  (puts the repository root, not tools/, on sys.path)

# None of these import paddle at import time (see trainer.py).
from tools.utils.checkpoint import PARAMS_FILE, load_checkpoint  # noqa: E402
from tools.utils.cli import config_arg_parser, run_tool  # noqa: E402
from tools.utils.console import format_infer_values, format_values, log, progress_bar, warn  # noqa: E402
from tools.utils.data import batches_then_none, count_samples, create_data_loader, expected_batches, loader_batch_size  # noqa: E402
from tools.utils.device import select_device  # noqa: E402
from tools.utils.distributed import merged_results, setup_data_parallel  # noqa: E402
from tools.utils.metric_values import scalar_dict  # noqa: E402
from tools.utils.metrics_log import MetricsLog, NoMetricsLog  # noqa: E402
from tools.utils.plugin import load_model_plugin  # noqa: E402
from tools.utils.runtime import seed_everything  # noqa: E402
from tools.utils.startup import load_run_config  # noqa: E402

INFER_METRICS_FILE = "infer_metrics.jsonl"
RANGE_KEYS = "runner.infer_start_epoch/runner.infer_end_epoch"


def checkpoint_folders(config):
    """{epoch: folder} for the requested range, all checked before any work."""
    load_dir = (config.resolve_path("runner.infer_load_path", required=False)
                or config.resolve_path("runner.model_save_path"))
    start = config.require("runner.infer_start_epoch", int)
    end = config.get("runner.infer_end_epoch")
    end = config.require("runner.epochs", int) if end is None else config.require("runner.infer_end_epoch", int)
    if end <= start:
        raise config.error(RANGE_KEYS, f"empty epoch range [{start}, {end})")
    folders = {}
    for epoch in range(start, end):
        folder = os.path.join(load_dir, str(epoch))
        if not os.path.isfile(os.path.join(folder, PARAMS_FILE)):
            raise config.error(RANGE_KEYS, f"no checkpoint {os.path.join(folder, PARAMS_FILE)} "
                               f"for epoch {epoch} of [{start}, {end})")
        folders[epoch] = folder
    return load_dir, folders


def evaluate(model_obj, model, config, epoch, loader, parallel, batch_size):
    """Run infer_forward over the loader; return (metric values, batches, samples).

    Data-parallel: the ranks go through their batches in step (a small
    all-reduce per batch says which ranks still have one), so a rank that
    finishes early waits for the others, and batches/samples count all ranks.
    """
    print_interval = config["runner.print_interval"]
    parallel.barrier(f"infer epoch {epoch}: start")  # ranks may arrive far apart (loading, data building)
    metrics, names = model_obj.create_metrics()
    batches = samples = 0
    bar = progress_bar(expected_batches(loader), f"infer epoch {epoch}")
    batch_iterator = batches_then_none(loader)
    batch_id = 0
    while True:
        batch = next(batch_iterator)
        own_samples, print_dict = 0, {}
        if batch is not None:
            metrics, print_dict = model_obj.infer_forward(model, metrics, batch, config)
            own_samples = count_samples(batch, batch_size)
        if parallel.enabled:
            active, batch_samples = parallel.active_ranks(batch is not None, own_samples,
                                                          f"infer epoch {epoch}, batch {batch_id}")
            if not active:
                break
        elif batch is None:
            break
        else:
            batch_samples = own_samples
        batches += 1
        samples += batch_samples
        if batch_id % print_interval == 0:
            shown, metric_values = merged_results(parallel, metrics, names, model_obj.create_metrics,
                                                  f"infer epoch {epoch}, batch {batch_id}: merging metrics",
                                                  scalar_dict(print_dict), own_samples)
            log(f"epoch: {epoch}, batch_id: {batch_id}, {format_values({**shown, **metric_values})}")
        bar.update(1)
        batch_id += 1
    bar.close()
    if batches == 0:
        warn(f"epoch {epoch}: the evaluation loader gave no batches")
        return {}, 0, 0
    _, metric_values = merged_results(parallel, metrics, names, model_obj.create_metrics,
                                      f"infer epoch {epoch}: merging metrics")
    return metric_values, batches, samples


def infer(args):
    config, _ = load_run_config(args.config, args.overrides)
    load_dir, folders = checkpoint_folders(config)
    print_interval = config.require("runner.print_interval", int)
    config.require("runner.infer_batch_size", int)
    if print_interval < 1:
        raise config.error("runner.print_interval", f"must be at least 1, got {print_interval}")
    seed = config.require("runner.seed", int)

    device = select_device(config)
    parallel = setup_data_parallel(config, device)
    rank, world_size = parallel.rank, parallel.world_size
    batch_size = loader_batch_size(config, "infer", world_size)
    seed_everything(seed)
    model_obj = load_model_plugin(config)
    model = model_obj.create_model(config)

    # Built before the results file is opened, so a bad data folder or
    # reader fails without touching it. Every checkpoint is evaluated on
    # the same data (epoch 0 of the reader) with the same seed, so their
    # results are comparable.
    seed_everything(seed)
    loader = create_data_loader(config, "infer", rank, world_size, epoch=0)
    results_path = os.path.join(load_dir, INFER_METRICS_FILE)
    # Only rank 0 appends to the results file.
    with (MetricsLog(results_path, append=True) if parallel.is_main else NoMetricsLog()) as results_log:
        for index, (epoch, folder) in enumerate(folders.items()):
            load_checkpoint(folder, model)
            if index > 0:
                seed_everything(seed)
                loader = create_data_loader(config, "infer", rank, world_size, epoch=0)
            start = time.perf_counter()
            values, batches, samples = evaluate(model_obj, model, config, epoch, loader, parallel, batch_size)
            seconds = time.perf_counter() - start
            log(f"epoch {epoch}: {format_infer_values(values) or 'no results'}")
            results_log.write("infer", {"epoch": epoch, "checkpoint": folder},
                              {**values, "batches": batches, "samples": samples, "seconds": round(seconds, 3)})
    log(f"infer done: {len(folders)} checkpoint(s) from {load_dir}; results appended to {results_path}")


def main(argv=None) -> int:
    args = config_arg_parser("Evaluate the epoch checkpoints of the model plugin next to a config.").parse_args(argv)
    return run_tool(infer, args)


if __name__ == "__main__":
    sys.exit(main())

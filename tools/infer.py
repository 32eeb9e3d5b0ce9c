"""Evaluate the per-epoch checkpoints of a model plugin.

    python tools/infer.py -m models/<...>/config.yaml [-o key=value ...]

For each epoch in range(runner.infer_start_epoch, runner.infer_end_epoch)
(with runner.infer_best=True: only the epoch named in
<runner.infer_load_path>/best.json, which training with validation writes)
this loads <runner.infer_load_path>/<epoch>, runs the plugin's
infer_forward over the evaluation loader, prints one summary line and
appends an "infer" record to <runner.infer_load_path>/infer_metrics.jsonl.
The evaluation loop is tools/utils/evaluation.py, which the trainer's
validation uses too. The tool does not call model.eval(): the plugin picks
its own mode (MAML adapts with batch statistics at test time).

Data-parallel (doc/distributed.md):
    python -m paddle.distributed.launch --nproc_per_node N tools/infer.py -m <config> -o runner.use_fleet=True
Each rank evaluates its share of every batch; the metrics are merged over
all ranks (metric state()/merge_states()) and rank 0 reports.
"""
import contextlib
import os
import sys
import time


if not __package__:  # run as a script, not imported as tools.<name>
    import _repo_path  # noqa: F401  (puts the repository root, not tools/, on sys.path)

# None of these import paddle at import time (see trainer.py).
from tools.utils.checkpoint import PARAMS_FILE, load_checkpoint  # noqa: E402
from tools.utils.cli import config_arg_parser, load_run_config, run_tool  # noqa: E402
from tools.utils.console import UserError, log  # noqa: E402
from tools.utils.data import loader_batch_size  # noqa: E402
from tools.utils.distributed import setup_data_parallel  # noqa: E402
from tools.utils.environment import seed_everything, select_device  # noqa: E402
from tools.utils.evaluation import BEST_FILE, best_epoch_of, evaluate, evaluation_loader, format_results  # noqa: E402
from tools.utils.metrics import MetricsLog, open_visual_log  # noqa: E402
from tools.utils.plugin import evaluation_note, load_model_plugin  # noqa: E402

INFER_METRICS_FILE = "infer_metrics.jsonl"
RANGE_KEYS = "runner.infer_start_epoch/runner.infer_end_epoch"


def best_checkpoint(load_dir):
    """({epoch: folder}, description) for the epoch named in <load_dir>/best.json."""
    best_path = os.path.join(load_dir, BEST_FILE)
    epoch, best = best_epoch_of(best_path)
    params = os.path.join(load_dir, str(epoch), PARAMS_FILE)
    if not os.path.isfile(params):
        raise UserError(f"{best_path}: names epoch {epoch}, but there is no checkpoint {params}")
    value = best.get("value")
    shown = f"{value:.4f}" if isinstance(value, float) else str(value)
    return {epoch: os.path.dirname(params)}, (f"runner.infer_best: evaluating epoch {epoch}, the best by validation "
                                              f"{best.get('metric')} ({best.get('mode')}, {shown}) in {best_path}")


def checkpoint_folders(config):
    """(load folder, {epoch: folder}, note) for the requested epochs, all checked before any work."""
    load_dir = (config.resolve_path("runner.infer_load_path", required=False)
                or config.resolve_path("runner.model_save_path"))
    if config.require("runner.infer_best", bool):
        folders, note = best_checkpoint(load_dir)
        return load_dir, folders, note
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
    return load_dir, folders, None


def infer(args):
    config, plugin_module = load_run_config(args.config, args.overrides)
    load_dir, folders, selection_note = checkpoint_folders(config)
    note = evaluation_note(plugin_module)
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
    if selection_note:
        parallel.check_same(sorted(folders), f"the epoch named in {os.path.join(load_dir, BEST_FILE)}")
        log(selection_note)

    # Built before the results file is opened, so a bad data folder or
    # reader fails without touching it. Every checkpoint is evaluated on
    # the same data (epoch 0 of the reader) with the same seed, so their
    # results are comparable.
    loader = evaluation_loader(config, "infer", rank, world_size, seed)
    results_path = os.path.join(load_dir, INFER_METRICS_FILE)
    best = {"best": True} if selection_note else {}
    visual = open_visual_log(config, "infer", parallel.is_main)
    steps_before = 0  # VisualDL steps count batches over all checkpoints, as in PaddleRec
    # Only rank 0 appends to the results file.
    with MetricsLog(results_path if parallel.is_main else None, append=True) as results_log, \
            visual or contextlib.nullcontext():
        for index, (epoch, folder) in enumerate(folders.items()):
            load_checkpoint(folder, model)
            if index > 0:
                loader = evaluation_loader(config, "infer", rank, world_size, seed)
            start = time.perf_counter()
            on_interval = visual and (lambda batch_id, shown: visual.add(shown, steps_before + batch_id))
            values, batches, samples = evaluate(model_obj, model, config, epoch, loader, parallel, batch_size,
                                                on_interval=on_interval)
            steps_before += batches
            seconds = time.perf_counter() - start
            log(f"epoch {epoch}: {format_results(values)}")
            results_log.write("infer", {"epoch": epoch, "checkpoint": folder, **best},
                              {**values, "batches": batches, "samples": samples, "seconds": round(seconds, 3)})
    log(f"infer done: {len(folders)} checkpoint(s) from {load_dir}; results appended to {results_path}")
    if note:
        log(f"evaluation: {note}")


def main(argv=None) -> int:
    args = config_arg_parser("Evaluate the epoch checkpoints of the model plugin next to a config.").parse_args(argv)
    return run_tool(infer, args)


if __name__ == "__main__":
    sys.exit(main())

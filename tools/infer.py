"""Evaluate the per-epoch checkpoints of a model plugin (doc/tools.md).

    python tools/infer.py -m models/<...>/config.yaml [-o key=value ...]
    python -m paddle.distributed.launch --nproc_per_node N tools/infer.py -m <config> -o runner.use_fleet=True

Evaluates <runner.infer_load_path>/<epoch> for each epoch in [runner.infer_start_epoch, runner.infer_end_epoch)
(runner.infer_best=True: the one best.json names; with runner.infer_ensemble=N the N best of its validated epochs,
as one ensemble) with the validation's loop, appending to infer_metrics.jsonl.
"""
import contextlib
import os
import sys

if not __package__:  # run as a script, not imported as tools.<name>
    import _repo_path  # noqa: F401  (puts the repository root, not tools/, on sys.path)

# None of these import paddle at import time: environment.load_run_config prepares the environment first.
from tools.utils.checkpoint import check_output_file  # noqa: E402
from tools.utils.console import config_arg_parser, format_results, log, run_tool  # noqa: E402
from tools.utils.distributed import setup_data_parallel  # noqa: E402
from tools.utils.environment import load_run_config, seed_everything, select_device  # noqa: E402
from tools.utils.evaluation import BEST_FILE, checkpoint_folders, evaluate, evaluation_loader, load_models  # noqa
from tools.utils.metrics import MetricsLog, VisualLog  # noqa: E402
from tools.utils.plugin import evaluation_note, load_model_plugin, recorded_settings  # noqa: E402


def infer(args):
    config, plugin_module = load_run_config(args.config, args.overrides, data_parallel=True)
    load_dir, folders, chosen = checkpoint_folders(config)
    seed, ensemble = config["runner.seed"], config["runner.infer_ensemble"] > 1
    parallel = setup_data_parallel(config, select_device(config))
    seed_everything(seed)
    plugin = load_model_plugin(config)
    if ensemble:
        plugin.require("ensemble", f"{config.config_dir}: runner.infer_ensemble")
    if chosen is not None:
        parallel.check_same(sorted(folders), f"the epoch named in {os.path.join(load_dir, BEST_FILE)}")
        log(chosen)
    # What is evaluated: each epoch alone, or (runner.infer_ensemble) all of them as one ensemble.
    runs = [(list(folders), list(folders.values()))] if ensemble else [([e], [f]) for e, f in folders.items()]
    models = load_models(plugin, config, runs[0][1])  # made before seeding: each run draws the same numbers
    # Built before the results file is opened, so a bad data folder or reader fails without touching it.
    loader = evaluation_loader(config, "infer", parallel, seed)
    results_path = os.path.join(load_dir, "infer_metrics.jsonl")
    if parallel.is_main:
        check_output_file(results_path, "metrics")  # appended to: it must be a metrics file already, or absent
    visual = VisualLog(config, "infer", parallel.is_main)
    # Evaluations of one folder on other data or settings share the file: each record says what it measured.
    measured = {"config": os.path.abspath(config.path), "overrides": list(args.overrides),
                "data_dir": config.resolve_path("runner.test_data_dir"), "settings": recorded_settings(config)}
    steps_before = 0  # VisualDL steps count batches over all checkpoints, as in PaddleRec
    results_log = MetricsLog(results_path if parallel.is_main else None, append=True)
    with contextlib.closing(results_log), contextlib.closing(visual):
        for index, (epochs, paths) in enumerate(runs):
            if index > 0:  # every checkpoint is evaluated on the same data with the same seed
                models = load_models(plugin, config, paths)
                loader = evaluation_loader(config, "infer", parallel, seed)
            label = "+".join(map(str, epochs))
            values, counts = evaluate(
                plugin, plugin.ensemble(models, config) if ensemble else models[0], config, label, loader, parallel,
                on_interval=lambda batch_id, shown: visual.add(shown, steps_before + batch_id))
            steps_before += counts["batches"]
            log(f"epoch {label}: {format_results(values)}")
            which = ({"epochs": epochs, "checkpoints": paths, "ensemble": len(epochs)} if ensemble else
                     {"epoch": epochs[0], "checkpoint": paths[0]})
            results_log.write("infer", {**which, **({"best": True} if chosen else {}), **measured},
                              {**values, **counts})
    log(f"infer done: {len(folders)} checkpoint(s) from {load_dir}; results appended to {results_path}")
    note = evaluation_note(plugin_module, config)
    if note:
        log(f"evaluation: {note}")


def main(argv=None) -> int:
    args = config_arg_parser("Evaluate the epoch checkpoints of the model plugin next to a config.").parse_args(argv)
    return run_tool(infer, args)


if __name__ == "__main__":
    sys.exit(main())

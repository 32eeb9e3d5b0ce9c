"""Evaluation, shared by infer.py and validation so both compute their figures alike; the best epoch by
validation, kept in <runner.model_save_path>/best.json; the checkpoints infer.py and predict.py load."""
import math
import os
import time

from tools.utils.checkpoint import PARAMS_FILE, is_count, load_checkpoint, optional, read_json_object
from tools.utils.checkpoint import write_json_atomically
from tools.utils.config import is_number
from tools.utils.console import UserError, format_number, format_values, log, progress_bar, warn
from tools.utils.environment import seed_everything
from tools.utils.metrics import scalar_dict
from tools.utils.plugin import batches_then_none, count_samples, create_data_loader, expected_batches
from tools.utils.plugin import recorded_settings

BEST_FILE = "best.json"
MODES = ("max", "min")
SETTING_KEYS = ("valid_data_dir", "valid_tasks")  # what validation values were measured on


def validation_config(config):
    """The config validation runs with: runner.test_data_dir and runner.infer_tasks, which readers and plugins read,
    hold runner.valid_data_dir and runner.valid_tasks (if set); errors name those."""
    aliases = {"runner.test_data_dir": "runner.valid_data_dir", "runner.infer_tasks": "runner.valid_tasks"}
    aliases = {key: alias for key, alias in aliases.items() if config.get(alias) is not None}
    return config.view({key: config[alias] for key, alias in aliases.items()}, aliases)


def evaluation_loader(config, mode, parallel, seed):
    """A loader of the evaluation data ("infer" or "valid"), seeded: every evaluation sees the same data (reader
    epoch 0) and random state, so checkpoints compare."""
    seed_everything(seed)
    return create_data_loader(config, mode, parallel.rank, parallel.world_size, epoch=0)


def evaluate(model_obj, model, config, epoch, loader, parallel, name="infer", on_interval=lambda *_: None):
    """The plugin's infer_forward over the loader: (metric values, {batches, samples, seconds}) of all ranks, which
    go in step (a sum per batch says how many still have one); on_interval(batch_id, values) gets each log line's."""
    prefix, start = "" if name == "infer" else f"{name} ", time.perf_counter()
    parallel.barrier(f"{name} epoch {epoch}: start")  # ranks may arrive far apart (loading, data building)
    metrics, names = model_obj.create_metrics()
    batches = samples = 0
    bar = progress_bar(expected_batches(loader), f"{name} epoch {epoch}")
    for batch_id, batch in enumerate(batches_then_none(loader)):
        own_samples, print_dict = 0, {}
        if batch is not None:
            metrics, print_dict = model_obj.infer_forward(model, metrics, batch, config)
            own_samples = count_samples(batch, loader.batch_size)
        label = f"{name} epoch {epoch}, batch {batch_id}"
        active, batch_samples = parallel.sum([batch is not None, own_samples], label)
        if not active:
            break
        batches, samples = batches + 1, samples + int(batch_samples)
        if batch_id % config["runner.print_interval"] == 0:
            shown, metric_values = parallel.merged_results(
                metrics, names, model_obj.create_metrics, f"{label}: merging metrics", scalar_dict(print_dict),
                own_samples)
            log(f"{prefix}epoch: {epoch}, batch_id: {batch_id}, {format_values({**shown, **metric_values})}")
            on_interval(batch_id, {**shown, **metric_values})
        bar.update(1)
    bar.close()
    counts = {"batches": batches, "samples": samples, "seconds": round(time.perf_counter() - start, 3)}
    if batches == 0:
        warn(f"{prefix}epoch {epoch}: the evaluation loader gave no batches")
        return {}, counts
    _, metric_values = parallel.merged_results(metrics, names, model_obj.create_metrics,
                                               f"{name} epoch {epoch}: merging metrics")
    return metric_values, counts


def _finite(value) -> bool:
    return is_number(value) and math.isfinite(value)


def _history_entry(entry) -> bool:
    return (isinstance(entry, dict) and is_count(entry.get("epoch")) and isinstance(entry.get("values"), dict)
            and all(isinstance(value, (int, float, str, type(None))) for value in entry["values"].values())
            and isinstance(entry.get("checkpoint", ""), (str, type(None))))


def read_best_file(path) -> dict:
    """best.json, checked; a missing or corrupt file is a UserError naming it."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found (written by training with runner.valid_data_dir set)")
    return read_json_object(path, "best.json", [
        ("history", optional(lambda history: isinstance(history, list) and all(map(_history_entry, history))),
         'a list of {"epoch": <int>, "values": {<name>: <number>}} objects'),
        ("epoch", optional(is_count), "a non-negative integer"),
        ("metric", optional(lambda metric: isinstance(metric, str)), "a string"),
        ("mode", optional(MODES.__contains__), "max or min"),
        ("value", optional(_finite), "a finite number"),
        ("valid_data_dir", optional(lambda folder: isinstance(folder, str)), "a path"),
        ("valid_tasks", optional(is_count), "a count")])


def best_epochs_of(path, count=1):
    """(the `count` best validated epochs, best first; best.json contents) for runner.infer_best and
    runner.infer_ensemble."""
    data = read_best_file(path)
    metric = data.get("metric") or "acc"  # what ModelSelection.resume takes a file without one to be ranked by
    if data.get("epoch") is None:
        raise UserError(f"{path}: names no best epoch (no validated epoch had a finite {metric} value)")
    if count == 1:
        return [data["epoch"]], data
    ranked = ModelSelection(path, metric, data.get("mode") or "max", history=data.get("history") or []).ranked
    if len(ranked) < count:
        raise UserError(f"{path}: {len(ranked)} validated epoch(s) with a finite {metric} value, fewer than "
                        f"runner.infer_ensemble = {count}")
    return [entry["epoch"] for entry in ranked[:count]], data


class ModelSelection:
    """The validated epochs of a run; the best has the highest (mode max) or lowest (min) finite `metric`, the
    earlier on ties."""

    def __init__(self, path, metric, mode, settings=None, history=()):
        self.path, self.metric, self.mode = path, metric, mode
        self.settings = dict(settings or {})  # what the values were measured on (SETTING_KEYS)
        self.history = sorted(history, key=lambda entry: entry["epoch"])  # [{"epoch", "checkpoint", "values"}]

    @property
    def ranked(self):
        """The validated epochs with a finite metric, best first (sorting is stable: the earlier of equals first)."""
        scored = [entry for entry in self.history if _finite(entry["values"].get(self.metric))]
        return sorted(scored, key=lambda entry: entry["values"][self.metric], reverse=self.mode == "max")

    @property
    def best(self):
        return (self.ranked or [None])[0]

    @property
    def best_value(self):
        return None if self.best is None else self.best["values"][self.metric]

    def add(self, epoch, checkpoint, values) -> bool:
        """Record an epoch's validation results; True when it is the new best."""
        entry = {"epoch": int(epoch), "checkpoint": checkpoint, "values": dict(values)}
        self.history = sorted([item for item in self.history if item["epoch"] != epoch] + [entry],
                              key=lambda item: item["epoch"])
        return self.best is entry

    def save(self):
        best = self.best or {}
        write_json_atomically(self.path, {
            "epoch": best.get("epoch"), "metric": self.metric, "mode": self.mode, "value": self.best_value,
            "values": best.get("values", {}), "checkpoint": best.get("checkpoint"), **self.settings,
            "history": self.history})

    @classmethod
    def resume(cls, path, current, before_epoch):
        """(selection, changed) of a run resumed at `before_epoch` from best.json: later epochs are dropped (trained
        again), the best chosen again as the `current` selection does (None: as the file's), with a log line each."""
        data = read_best_file(path)
        if current is None:
            metric, mode = data.get("metric") or "acc", data.get("mode") or "max"
            settings = {key: data[key] for key in SETTING_KEYS if key in data}
        else:
            metric, mode, settings = current.metric, current.mode, current.settings
        history = data.get("history") or []
        kept = [{key: entry.get(key) for key in ("epoch", "checkpoint", "values")}
                for entry in history if entry["epoch"] < before_epoch]
        dropped = sorted(entry["epoch"] for entry in history if entry["epoch"] >= before_epoch)
        if dropped:
            log(f"{path}: dropped the validation results of epoch(s) {dropped}, which are trained again")
        reselected = (data.get("metric"), data.get("mode")) != (metric, mode) and bool(kept)
        if reselected:
            log(f"{path}: the earlier epochs were selected by {data.get('metric')} ({data.get('mode')}); "
                f"now by {metric} ({mode})")
        changed = [key for key, value in settings.items() if key in data and data[key] != value]
        if changed and kept:
            warn(f"{path}: the earlier epochs were validated with other "
                 f"{', '.join(f'runner.{key}' for key in changed)} "
                 f"({', '.join(repr(data[key]) for key in changed)}); their values are compared as they are")
        return cls(path, metric, mode, settings, kept), bool(dropped) or reselected


RANGE_KEYS = "runner.infer_start_epoch/runner.infer_end_epoch"


def checkpoint_folders(config):
    """(load folder, {epoch: folder}, why: with runner.infer_best the line saying which epoch best.json names,
    else None) for the requested epochs, all checked before any work."""
    load_dir = (config.resolve_path("runner.infer_load_path", required=False)
                or config.resolve_path("runner.model_save_path"))
    ensemble = config["runner.infer_ensemble"]
    if config["runner.infer_best"]:
        best_path = os.path.join(load_dir, BEST_FILE)
        epochs, best = best_epochs_of(best_path, ensemble)
        folders = {}
        for epoch in epochs:
            params = os.path.join(load_dir, str(epoch), PARAMS_FILE)
            if not os.path.isfile(params):
                raise UserError(f"{best_path}: names epoch {epoch}, but there is no checkpoint {params}")
            folders[epoch] = os.path.dirname(params)
        which = (f"epoch {epochs[0]}, the best" if ensemble == 1 else
                 f"the ensemble of epochs {', '.join(map(str, epochs))}, the {ensemble} best")
        return load_dir, folders, (f"runner.infer_best: evaluating {which} by validation {best.get('metric')} "
                                   f"({best.get('mode')}, {format_number(best.get('value'))}) in {best_path}")
    if ensemble > 1:
        raise config.error("runner.infer_ensemble", f"{ensemble} needs runner.infer_best: True (an ensemble is made "
                           "of the best validated epochs)")
    start = config.require("runner.infer_start_epoch", int)
    end = config.require("runner.epochs" if config.get("runner.infer_end_epoch") is None else "runner.infer_end_epoch",
                         int)
    if end <= start:
        raise config.error(RANGE_KEYS, f"empty epoch range [{start}, {end})")
    folders = {epoch: os.path.join(load_dir, str(epoch)) for epoch in range(start, end)}
    for epoch, folder in folders.items():
        if not os.path.isfile(os.path.join(folder, PARAMS_FILE)):
            raise config.error(RANGE_KEYS, f"no checkpoint {os.path.join(folder, PARAMS_FILE)} "
                               f"for epoch {epoch} of [{start}, {end})")
    return load_dir, folders, None


def load_models(plugin, config, folders):
    """A model of the plugin for each checkpoint folder, loaded (parameters only)."""
    models, settings = [plugin.create_model(config) for _ in folders], recorded_settings(config)
    for model, folder in zip(models, folders):
        load_checkpoint(folder, model, settings=settings)
    return models

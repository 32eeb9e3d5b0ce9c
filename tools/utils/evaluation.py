"""Evaluating a model, and choosing the best epoch by validation.

Evaluation runs the plugin's infer_forward over the evaluation loader; it is
shared by infer.py and the trainer's validation, so both compute their
figures the same way.

    loader = evaluation_loader(config, "infer", rank, world_size, seed)
    values, batches, samples = evaluate(model_obj, model, config, epoch, loader, parallel, batch_size)

Validation is an evaluation on runner.valid_data_dir: validation_config()
gives the config the reader and the plugin then see (runner.test_data_dir and
runner.infer_tasks replaced by the validation settings), and mode "valid"
builds its loader (tools/utils/data.py).

Model selection: the trainer validates some epochs (runner.valid_interval) and keeps the one
whose runner.valid_metric is highest (runner.valid_mode max) or lowest (min);
ties keep the earlier epoch, and a missing or non-finite value never wins.
<runner.model_save_path>/best.json holds the choice and every validated epoch's results:

    {"epoch": 3, "metric": "acc", "mode": "max", "value": 0.9712,
     "values": {"acc": 0.9712, "acc_ci95": 0.004, "tasks": 500},
     "checkpoint": ".../3", "valid_data_dir": ..., "valid_tasks": 500,
     "history": [{"epoch": 0, "checkpoint": ".../0", "values": {...}}, ...]}

It is rewritten atomically after every validation (only by rank 0). A resumed
run keeps the results of the epochs before the one it continues at and
selects among them again (so a changed metric or mode applies to them too);
infer.py's runner.infer_best reads "epoch".
"""
import math
import os

from tools.utils.checkpoint import is_count, read_json_object, write_json_atomically
from tools.utils.config import ConfigView, is_number
from tools.utils.console import UserError, format_infer_values, format_values, log, progress_bar, warn
from tools.utils.data import batches_then_none, count_samples, create_data_loader, expected_batches
from tools.utils.distributed import merged_results
from tools.utils.environment import seed_everything
from tools.utils.metrics import scalar_dict


def validation_enabled(config) -> bool:
    return config.get("runner.valid_data_dir") not in (None, "")


def validation_config(config):
    """The config validation runs with: readers read runner.test_data_dir and
    runner.infer_tasks for evaluation, so these hold runner.valid_data_dir and
    (when set) runner.valid_tasks; errors about them name the validation keys."""
    replacements = {"runner.test_data_dir": config.get("runner.valid_data_dir")}
    aliases = {"runner.test_data_dir": "runner.valid_data_dir"}
    if config.get("runner.valid_tasks") is not None:
        replacements["runner.infer_tasks"] = config.get("runner.valid_tasks")
        aliases["runner.infer_tasks"] = "runner.valid_tasks"
    return ConfigView(config, replacements, aliases)


def evaluation_loader(config, mode, rank, world_size, seed):
    """A fresh loader of the evaluation data ("infer" or "valid"), built after seeding with `seed`.

    Every evaluation sees the same data (reader epoch 0) with the same random
    state, so the results of different checkpoints are comparable.
    """
    seed_everything(seed)
    return create_data_loader(config, mode, rank, world_size, epoch=0)


def format_results(values) -> str:
    """'acc 0.9712 ± 0.0040 (95% CI, 1000 tasks)', or 'no results'."""
    return format_infer_values(values) or "no results"


def evaluate(model_obj, model, config, epoch, loader, parallel, batch_size, name="infer", on_interval=None):
    """Run infer_forward over the loader; return (metric values, batches, samples).

    `name` ("infer" or "valid") labels the log lines, the progress bar and
    the data-parallel sync points. The tool does not call model.eval() or
    paddle.no_grad(): the plugin chooses (MAML adapts with gradients).

    on_interval(batch_id, values), when given, also gets every logged line's values (VisualDL).

    Data-parallel: the ranks go through their batches in step (a small
    all-reduce per batch says which ranks still have one), so a rank that
    finishes early waits for the others, and batches/samples count all ranks.
    """
    print_interval = config["runner.print_interval"]
    line_prefix = "" if name == "infer" else f"{name} "
    parallel.barrier(f"{name} epoch {epoch}: start")  # ranks may arrive far apart (loading, data building)
    metrics, names = model_obj.create_metrics()
    batches = samples = 0
    bar = progress_bar(expected_batches(loader), f"{name} epoch {epoch}")
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
                                                          f"{name} epoch {epoch}, batch {batch_id}")
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
                                                  f"{name} epoch {epoch}, batch {batch_id}: merging metrics",
                                                  scalar_dict(print_dict), own_samples)
            log(f"{line_prefix}epoch: {epoch}, batch_id: {batch_id}, {format_values({**shown, **metric_values})}")
            if on_interval is not None:
                on_interval(batch_id, {**shown, **metric_values})
        bar.update(1)
        batch_id += 1
    bar.close()
    if batches == 0:
        warn(f"{line_prefix}epoch {epoch}: the evaluation loader gave no batches")
        return {}, 0, 0
    _, metric_values = merged_results(parallel, metrics, names, model_obj.create_metrics,
                                      f"{name} epoch {epoch}: merging metrics")
    return metric_values, batches, samples


BEST_FILE = "best.json"
MODES = ("max", "min")
SETTING_KEYS = ("valid_data_dir", "valid_tasks")  # what the values were measured on


def _finite(value) -> bool:
    return is_number(value) and math.isfinite(value)


def better(value, best_value, mode) -> bool:
    """Whether `value` beats `best_value` (None: nothing yet); strictly, so ties keep the earlier epoch."""
    if not _finite(value):
        return False
    if best_value is None:
        return True
    return value > best_value if mode == "max" else value < best_value


def _plain_values(values) -> bool:
    return isinstance(values, dict) and all(
        isinstance(value, (int, float, str)) or value is None for value in values.values())


def read_best_file(path) -> dict:
    """best.json as a dict, checked; a missing or corrupt file is a one-line UserError naming it."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found (written by training with runner.valid_data_dir set)")
    data = read_json_object(path, "best.json")
    history = data.get("history", [])
    if not isinstance(history, list) or not all(
            isinstance(entry, dict) and is_count(entry.get("epoch")) and _plain_values(entry.get("values"))
            and isinstance(entry.get("checkpoint", ""), (str, type(None))) for entry in history):
        raise UserError(f"{path}: corrupt best.json (\"history\" must be a list of "
                        "{\"epoch\": <int>, \"values\": {<name>: <number>}} objects)")
    if data.get("epoch") is not None and not is_count(data.get("epoch")):
        raise UserError(f"{path}: corrupt best.json (\"epoch\" must be a non-negative integer, "
                        f"got {data.get('epoch')!r})")
    for key, check in (("metric", lambda value: isinstance(value, str)), ("mode", lambda value: value in MODES),
                       ("value", lambda value: value is None or _finite(value))):
        if key in data and not check(data[key]):
            raise UserError(f"{path}: corrupt best.json (bad \"{key}\": {str(data[key])[:40]!r})")
    return data


def best_epoch_of(path):
    """(epoch, best.json contents) for runner.infer_best; UserError when the file names no epoch."""
    data = read_best_file(path)
    epoch = data.get("epoch")
    if epoch is None:
        raise UserError(f"{path}: names no best epoch (no validated epoch had a finite "
                        f"{data.get('metric', 'metric')} value)")
    return epoch, data


class ModelSelection:
    """The validated epochs of a run and the best of them; save() writes best.json."""

    def __init__(self, path, metric, mode, settings=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.path, self.metric, self.mode = path, metric, mode
        self.settings = dict(settings or {})  # what the values were measured on (valid_data_dir, valid_tasks)
        self.history = []  # [{"epoch", "checkpoint", "values"}], by epoch
        self.best = None  # the winning entry of history

    @property
    def best_value(self):
        return None if self.best is None else self.best["values"].get(self.metric)

    def add(self, epoch, checkpoint, values) -> bool:
        """Record an epoch's validation results; True when it is the new best."""
        entry = {"epoch": int(epoch), "checkpoint": checkpoint, "values": dict(values)}
        self.history = sorted([item for item in self.history if item["epoch"] != epoch] + [entry],
                              key=lambda item: item["epoch"])
        if self.best is not None and self.best["epoch"] == epoch:
            self._reselect()
            return self.best is entry
        if better(values.get(self.metric), self.best_value, self.mode):
            self.best = entry
            return True
        return False

    def _reselect(self):
        self.best = None
        for entry in self.history:
            if better(entry["values"].get(self.metric), self.best_value, self.mode):
                self.best = entry

    def to_json(self) -> dict:
        best = self.best or {}
        return {"epoch": best.get("epoch"), "metric": self.metric, "mode": self.mode,
                "value": self.best_value, "values": best.get("values", {}), "checkpoint": best.get("checkpoint"),
                **self.settings, "history": self.history}

    def save(self):
        write_json_atomically(self.path, self.to_json())

    @classmethod
    def resume(cls, path, metric, mode, settings, before_epoch):
        """The selection of a run resumed at `before_epoch`, from its best.json (fresh when there is none).

        metric/mode None (a run without validation): those stored in the file.

        Returns (selection, notes, warnings): results of epochs >= before_epoch
        are dropped (those epochs are trained again), and the best is chosen
        again with the current metric and mode. `notes` and `warnings` are
        lines saying what changed; a corrupt best.json is a UserError.
        """
        if not os.path.isfile(path):
            return cls(path, metric or "acc", mode or "max", settings), [], []
        data = read_best_file(path)
        if metric is None or mode is None:  # validation is off: keep the file's own choice
            metric = data.get("metric") if isinstance(data.get("metric"), str) else "acc"
            mode = data.get("mode") if data.get("mode") in MODES else "max"
            settings = {key: data[key] for key in SETTING_KEYS if key in data}
        selection = cls(path, metric, mode, settings)
        notes, warnings = [], []
        kept = [entry for entry in data.get("history", []) if entry["epoch"] < before_epoch]
        dropped = sorted(entry["epoch"] for entry in data.get("history", []) if entry["epoch"] >= before_epoch)
        if dropped:
            notes.append(f"{path}: dropped the validation results of epoch(s) {dropped}, which are trained again")
        selection.history = sorted(({"epoch": entry["epoch"], "checkpoint": entry.get("checkpoint"),
                                     "values": entry["values"]} for entry in kept), key=lambda item: item["epoch"])
        selection._reselect()
        if (data.get("metric"), data.get("mode")) != (metric, mode) and kept:
            notes.append(f"{path}: the earlier epochs were selected by {data.get('metric')} ({data.get('mode')}); "
                         f"now by {metric} ({mode})")
        changed = [key for key, value in selection.settings.items() if key in data and data[key] != value]
        if changed and kept:
            warnings.append(f"{path}: the earlier epochs were validated with other "
                         f"{', '.join(f'runner.{key}' for key in changed)} "
                         f"({', '.join(f'{data[key]!r}' for key in changed)}); their values are compared as they are")
        return selection, notes, warnings

"""Choosing the best epoch by validation: <runner.model_save_path>/best.json.

The trainer validates some epochs (runner.valid_interval) and keeps the one
whose runner.valid_metric is highest (runner.valid_mode max) or lowest (min);
ties keep the earlier epoch, and a missing or non-finite value never wins.
best.json holds the choice and every validated epoch's results:

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

from tools.utils.errors import UserError
from tools.utils.json_files import is_count, read_json_object, write_json_atomically

BEST_FILE = "best.json"
MODES = ("max", "min")
SETTING_KEYS = ("valid_data_dir", "valid_tasks")  # what the values were measured on


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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

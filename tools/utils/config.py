"""The run's settings, read before Paddle starts: a PaddleRec YAML config as a flat dict of dotted keys, `-o` overrides
typed like the value they replace, and the runner.* key table (`python -m tools.utils.config` prints it)."""
import difflib
import math
import numbers
import os
from collections import namedtuple

import yaml

from tools.utils.console import UserError, warn


class Bounds:
    """The values a setting accepts: low..high inclusive (None: unbounded; `high` may be a function of the machine,
    described by `text`), or only the text `choices`. Runner keys and environment variables share it."""

    def __init__(self, low=None, high=None, text=None, choices=None):
        self.low, self.high, self.text, self.choices = low, high, text, choices

    def problem(self, value):
        """Why `value` is out of range (a short phrase), or None."""
        if self.choices is not None:
            return None if value in self.choices else f"expected one of {', '.join(self.choices)}, got {value!r}"
        if not is_number(value):
            return None  # the type check speaks about it
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        high = self.high() if callable(self.high) else self.high
        if (self.low is not None and value < self.low) or (high is not None and value > high):
            return f"must be {self.describe(high)}{f' ({self.text})' if self.text else ''}, got {value}"
        return None

    def describe(self, high=None):
        if self.choices is not None:
            return " or ".join(self.choices)
        high = _number_text(high if high is not None else self.text or self.high)
        return f"at least {self.low}" if high is None else f"from {self.low} to {high}"


def _number_text(value):
    """2147483647 as 2^31-1, 1048576 as 2^20: the doc's ranges read as what they are."""
    for offset, suffix in ((0, ""), (1, "-1")):
        if is_number(value, int) and value >= 2 ** 16 and (value + offset) & (value + offset - 1) == 0:
            return f"2^{(value + offset).bit_length() - 1}{suffix}"
    return value


# Counts stop at int32's largest value (what Paddle's and numpy's index types hold); a batch is built in memory at
# once, so its size stops far lower.
COUNT, POSITIVE, BATCH = Bounds(0, 2 ** 31 - 1), Bounds(1, 2 ** 31 - 1), Bounds(1, 2 ** 20)
THREADS = Bounds(0, lambda: 4 * (os.cpu_count() or 1), "4 x the CPUs")  # more OpenMP threads only thrash, then abort
SEED = Bounds(0, 2 ** 32 - 1)  # numpy's seed range (Paddle takes up to 2**64 - 1)
SECONDS = Bounds(1, 7 * 24 * 3600)  # a week: any longer wait is a hang
ENSEMBLE = Bounds(1, 1000)  # every member is a model held in memory

# paddlerec: how the key relates to PaddleRec's tools: "same", "extended" (more to it, said in the doc), NO_EFFECT
# (accepted; a warning when set) or "" (not a PaddleRec key). A default of None means none (a tool that needs the key
# says "missing required key") or, where the doc says so, one derived from another key.
RunnerKey = namedtuple("RunnerKey", ["default", "type", "doc", "paddlerec", "bounds"], defaults=["", None])
NO_EFFECT = "no effect here"

# The runner.* keys the tools understand; `type` checks YAML and -o values, `bounds` the range of a number.
RUNNER_DEFAULTS = {
    "runner.use_gpu": RunnerKey(False, bool, "Run on a GPU when this Paddle build and the machine have one; else warn and use the CPU.", "extended: default False, and a GPU that is missing gives a warning and the CPU"),
    "runner.epochs": RunnerKey(1, int, "Number of training epochs (counted from 0; a resumed run continues up to this number).", "same", bounds=POSITIVE),
    "runner.train_batch_size": RunnerKey(None, int, "Batch size of the training loader (required for training).", "same", bounds=BATCH),
    "runner.infer_batch_size": RunnerKey(None, int, "Batch size of the evaluation loader (required for infer).", "same", bounds=BATCH),
    "runner.print_interval": RunnerKey(10, int, "Log a line and a metrics record every this many batches.", "same", bounds=POSITIVE),
    "runner.model_save_path": RunnerKey("output_model", str, "Folder that receives one checkpoint folder per epoch, named by the epoch number, holding rec.pdparams and rec.pdopt.", "extended: written atomically with meta.json; a relative path is relative to the config's folder (PaddleRec: the current folder)"),
    "runner.overwrite": RunnerKey(False, bool, "A fresh start (no runner.resume_path; a warm start from runner.model_init_path counts as fresh) into a runner.model_save_path that holds checkpoints is refused unless this is True; then the old run (its checkpoint folders, metrics.jsonl, best.json, infer_metrics.jsonl) is removed, as a whole, before training starts. Only what a run writes is removed: a folder named by a number counts as a checkpoint only when it holds rec.pdparams and nothing but checkpoint files; a folder or file that is not the trainer's where a checkpoint would go is refused. Also lets a fresh start replace the metrics file of another run at runner.metrics_path."),
    "runner.model_init_path": RunnerKey("", str, "Warm start, as in PaddleRec: a checkpoint epoch folder whose parameters (only) the model starts from; training runs from epoch 0 with a fresh optimizer. Empty: random initialisation.", "same"),
    "runner.resume_path": RunnerKey("", str, "Continue a run: a checkpoint epoch folder (parameters + optimizer state); training continues at the next epoch, bit-identical to an uninterrupted run. auto: the newest complete epoch folder in runner.model_save_path, or a fresh start when there is none. Empty: start fresh."),
    "runner.infer_load_path": RunnerKey("", str, "Folder holding the epoch checkpoints to evaluate. Empty: runner.model_save_path.", "extended: empty means runner.model_save_path; relative to the config's folder"),
    "runner.infer_start_epoch": RunnerKey(0, int, "First checkpoint epoch evaluated by infer.", "same", bounds=COUNT),
    "runner.infer_end_epoch": RunnerKey(None, int, "Checkpoint epoch where infer stops (exclusive). Unset: runner.epochs.", "extended: unset means runner.epochs (PaddleRec: 10)", bounds=COUNT),
    "runner.infer_best": RunnerKey(False, bool, "infer evaluates only the epoch named in best.json of the infer load folder (written by training with validation), instead of runner.infer_start_epoch/runner.infer_end_epoch."),
    "runner.infer_ensemble": RunnerKey(1, int, "with runner.infer_best: evaluate the N best validated epochs of best.json as one ensemble (the model plugin's ensemble() combines them; MAML averages class probabilities) instead of the best epoch alone.", bounds=ENSEMBLE),
    "runner.train_data_dir": RunnerKey(None, str, "Folder whose entries (sorted, absolute paths) are handed to the training reader.", "same"),
    "runner.test_data_dir": RunnerKey(None, str, "Folder whose entries (sorted, absolute paths) are handed to the evaluation reader.", "same"),
    "runner.train_reader_path": RunnerKey(None, str, "Reader module for training, relative to the config folder (importlib name, .py optional).", "same"),
    "runner.infer_reader_path": RunnerKey(None, str, "Reader module for evaluation, relative to the config folder (importlib name, .py optional).", "same"),
    "runner.seed": RunnerKey(2026, int, "Seed for random, numpy and paddle; each epoch reseeds from it so resumed runs match uninterrupted ones.", "extended: also seeds random and numpy, and reseeds every epoch (PaddleRec's default: 12345)", bounds=SEED),
    "runner.deterministic": RunnerKey(True, bool, "Set FLAGS_cudnn_deterministic=1 before Paddle starts."),
    "runner.num_threads": RunnerKey(0, int, "CPU threads for Paddle; 0 means all cores (divided among the data-parallel processes of a host).", bounds=THREADS),
    "runner.metrics_path": RunnerKey("", str, "JSON-lines metrics file of a training run. Empty: metrics.jsonl inside runner.model_save_path. An existing file that is not a metrics file (a checkpoint, a config) is refused; another run's metrics file only with runner.overwrite=True."),
    "runner.use_fleet": RunnerKey(False, bool, "Data-parallel training and evaluation over the processes of python -m paddle.distributed.launch (see doc/distributed.md). True without a launcher is an error.", "extended: also shards evaluation and checks the ranks agree"),
    "runner.sync_timeout": RunnerKey(1800, int, "Data-parallel runs: seconds a rank waits for the others at the start of each epoch or evaluation before failing with an error naming the missing ranks (inside an epoch the backend's own limit applies, see doc/distributed.md).", bounds=SECONDS),
    "runner.use_auc": RunnerKey(False, bool, "PaddleRec resets the metrics after each epoch only when True (else its infer accumulates them over the checkpoints); here they always start afresh for every epoch and every evaluated checkpoint.", "extended: always as PaddleRec with True"),
    "runner.use_visual": RunnerKey(False, bool, "Write VisualDL scalars, as PaddleRec: <config folder>/visualDL_log/train (tags train/<key>: loss, metrics, every runner.print_interval batches) and visualDL_log/infer (infer/<key>). Needs the optional visualdl package (pip install -e \".[visual]\"); view with visualdl --logdir visualDL_log.", "same"),
    "runner.use_xpu": RunnerKey(False, bool, "PaddleRec runs on a Kunlun XPU; these tools run on the CPU or a CUDA GPU only.", NO_EFFECT),
    "runner.use_npu": RunnerKey(False, bool, "PaddleRec runs on an Ascend NPU; these tools run on the CPU or a CUDA GPU only.", NO_EFFECT),
    "runner.use_inference": RunnerKey(False, bool, "PaddleRec's static-graph trainer exports an inference model; these tools save dygraph checkpoints (rec.pdparams) only.", NO_EFFECT),
    "runner.save_inference_feed_varnames": RunnerKey(None, list, "Inputs of PaddleRec's exported inference model (runner.use_inference); nothing is exported here.", NO_EFFECT),
    "runner.save_inference_fetch_varnames": RunnerKey(None, list, "Outputs of PaddleRec's exported inference model (runner.use_inference); nothing is exported here.", NO_EFFECT),
    "runner.num_workers": RunnerKey(0, int, "PaddleRec's DataLoader worker processes; here the loader reads in the main process, since readers draw seeded samples whose order workers would make depend on scheduling.", NO_EFFECT, bounds=COUNT),
    "runner.thread_num": RunnerKey(None, int, "Threads of PaddleRec's static-graph QueueDataset/InMemoryDataset; there is no such dataset here (CPU threads: runner.num_threads).", NO_EFFECT, bounds=COUNT),
    "runner.reader_type": RunnerKey(None, str, "PaddleRec's static-graph reader (QueueDataset, InMemoryDataset, DataLoader); here it is always a DataLoader over the reader's RecDataset.", NO_EFFECT),
    "runner.user_define_reader": RunnerKey(False, bool, "PaddleRec's flag for a reader of its own making; every reader here is the model's RecDataset.", NO_EFFECT),
    "runner.tasks_per_epoch": RunnerKey(None, int, "Read by readers: training samples or tasks per epoch (reader's own default when unset).", bounds=POSITIVE),
    "runner.infer_tasks": RunnerKey(None, int, "Read by readers: evaluation samples or tasks (reader's own default when unset).", bounds=POSITIVE),
    "runner.valid_data_dir": RunnerKey("", str, "Validation data folder, read by the evaluation reader (runner.infer_reader_path) like runner.test_data_dir. Empty: no validation during training."),
    "runner.valid_interval": RunnerKey(1, int, "Validate after every this many epochs (epochs N-1, 2N-1, ...); the last epoch is always validated.", bounds=POSITIVE),
    "runner.valid_tasks": RunnerKey(None, int, "Validation samples or tasks; the reader sees it as runner.infer_tasks. Unset: runner.infer_tasks.", bounds=POSITIVE),
    "runner.valid_metric": RunnerKey("acc", str, "Validation result (a key as logged, e.g. acc) that selects the best epoch, recorded in best.json of runner.model_save_path."),
    "runner.valid_mode": RunnerKey("max", str, "max: the highest runner.valid_metric is best; min: the lowest. Ties keep the earlier epoch.", bounds=Bounds(choices=("max", "min"))),
}


def keys_without_effect(config):
    """[(key, why)] of the PaddleRec keys set to something that would act in PaddleRec but not here."""
    return [(key, spec.doc) for key, spec in RUNNER_DEFAULTS.items()
            if spec.paddlerec == NO_EFFECT and config.get(key) not in (None, False, "", spec.default)]


def is_number(value, type_=numbers.Real) -> bool:
    """A number of `type_` that is not a bool (YAML/JSON true is no count)."""
    return isinstance(value, type_) and not isinstance(value, bool)


def _type_text(type_) -> str:
    return "a list" if type_ is list else type_.__name__


def check_type(value, type_):
    """`value` if it fits `type_` (None: anything goes; an int is widened for a float), else ValueError."""
    if type_ is float and is_number(value, int):
        return float(value)
    if type_ is not None and (not isinstance(value, type_) or (type_ in (int, float) and isinstance(value, bool))):
        raise ValueError(f"expected {_type_text(type_)}, got {'None' if value is None else type(value).__name__} "
                         f"{value!r}")
    return value


def convert_value(text: str, type_, none_allowed=False):
    """Override text as a YAML value of `type_`; a bool also 1/0, a float as float() reads it (YAML: 1e-3 is text)."""
    if none_allowed and text.strip().lower() in ("null", "none", "~"):
        return None
    if type_ is str:
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if type_ is bool and value in (0, 1) and is_number(value, int):
        value = bool(value)
    if type_ is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    try:
        return check_type(value, type_)
    except ValueError:
        raise ValueError(f"expected {_type_text(type_)}, got {text!r}") from None


def unknown_key(key, known) -> str:
    """'unknown key (did you mean a, b?)': the known keys about as close as the best (the long shared prefixes,
    "runner.", make many look alike)."""
    scored = sorted(((difflib.SequenceMatcher(None, key, other).ratio(), other) for other in known), reverse=True)
    hint = [other for ratio, other in scored[:3] if ratio >= max(0.6, scored[0][0] - 0.05)] if scored else []
    return "unknown key" + (f" (did you mean {', '.join(hint)}?)" if hint else "")


def flatten(mapping, prefix=""):
    """{'a': {'b': 1, 'c': [1]}} -> {'a.b': 1, 'a.c': [1]}; lists are leaves."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Config(dict):
    """Flat dotted-key config that knows its file and the type of each key; in a view, errors name the key the user
    set through `aliases` (validation's runner.test_data_dir is runner.valid_data_dir)."""

    def __init__(self, values, path, key_types=None, aliases=None):
        super().__init__(values)
        self.path, self.key_types, self.aliases = path, dict(key_types or {}), dict(aliases or {})
        self.setdefault("config_abs_dir", os.path.dirname(os.path.abspath(path)))

    @property
    def config_dir(self) -> str:
        return self["config_abs_dir"]

    def view(self, replacements, aliases):
        return Config({**self, **replacements}, self.path, self.key_types, {**self.aliases, **aliases})

    def error(self, key_or_path, message) -> UserError:
        return UserError(f"{self.path}: {self.aliases.get(key_or_path, key_or_path)}: {message}")

    def require(self, key, type_=None, bounds=None):
        """The value of `key`; a UserError if it is missing, mistyped or out of `bounds`."""
        if self.get(key) is None:
            raise self.error(key, "missing required key")
        try:
            value = check_type(self[key], type_)
        except ValueError as reason:
            raise self.error(key, str(reason)) from None
        problem = bounds and bounds.problem(value)
        if problem:
            raise self.error(key, problem)
        return value

    def resolve_path(self, key, required=True):
        """The path in `key`, relative to the config's folder as in PaddleRec; empty is unset (required: an error)."""
        value = self.get(key)
        if value in (None, ""):
            if required:
                raise self.error(key, "missing required key")
            return None
        return os.path.normpath(os.path.join(self.config_dir, os.path.expanduser(str(value))))

    def apply_override(self, item):
        key, equals, text = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise self.error(f"-o {item}", "expected key=value")
        if key not in self.key_types:
            known = sorted(set(self.key_types) | set(self) - {"config_abs_dir"})
            raise self.error(f"-o {key}", unknown_key(key, known))
        spec = RUNNER_DEFAULTS.get(key)
        none_allowed = self.get(key) is None or (spec is not None and spec.default is None)
        try:
            self[key] = convert_value(text, self.key_types[key], none_allowed)
        except ValueError as reason:
            raise self.error(f"-o {key}", str(reason)) from None


def read_yaml_mapping(path):
    """The YAML file as a dict; every failure is a one-line UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: " + ("is a folder, expected a YAML config file" if os.path.isdir(path) else
                                       "config file not found"))
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except (OSError, UnicodeDecodeError) as reason:
        raise UserError(f"{path}: cannot read config file: {getattr(reason, 'strerror', None) or reason}") from None
    except yaml.YAMLError as reason:
        mark = getattr(reason, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise UserError(f"{path}: {where}YAML syntax error: {getattr(reason, 'problem', None) or 'invalid YAML'}") \
            from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping of sections, got "
                        f"{'None' if data is None else type(data).__name__}")
    return data


def _type_of(value):
    """The type an override of this value must have (None: whatever YAML reads)."""
    return type(value) if isinstance(value, (bool, int, float, str, list)) else None


def load_config(path, overrides=(), plugin_defaults=None, plugin_keys=()) -> Config:
    """Plugin CONFIG_DEFAULTS, runner defaults, the YAML, then `-o` overrides, each over the last, the runner.* values
    checked; with the plugin's keys, a YAML key none of them declares gets a warning."""
    yaml_values = flatten(read_yaml_mapping(path))
    yaml_values.pop("config_abs_dir", None)  # computed, never read
    with_plugin, plugin_defaults = plugin_defaults is not None, plugin_defaults or {}
    types = {key: _type_of(value) for key, value in yaml_values.items()}
    types.update({key: _type_of(value) for key, value in plugin_defaults.items()
                  if value is not None or key not in types})
    types.update({key: spec.type for key, spec in RUNNER_DEFAULTS.items()})
    defaults = {key: spec.default for key, spec in RUNNER_DEFAULTS.items()}
    config = Config({**plugin_defaults, **defaults, **yaml_values}, path, types)
    for item in overrides:
        config.apply_override(item)
    for key, spec in RUNNER_DEFAULTS.items():
        if config[key] is None and spec.default in (None, ""):
            config[key] = spec.default  # null in the YAML: unset
        else:
            config[key] = config.require(key, spec.type, spec.bounds)
    if with_plugin:  # once, when the plugin's keys are known too; outside runner.* only when it declares its keys
        known = set(RUNNER_DEFAULTS) | set(plugin_keys) | set(plugin_defaults)
        for key in sorted(yaml_values.keys() - known):
            if plugin_keys or plugin_defaults or key.startswith("runner."):
                warn(f"{config.path}: {key}: {unknown_key(key, sorted(known))}")
    return config


def runner_keys_markdown() -> str:
    lines = ["| key | type | range | default | PaddleRec | meaning |", "| --- | --- | --- | --- | --- | --- |"]
    for key, spec in RUNNER_DEFAULTS.items():
        default = "(unset)" if spec.default is None else '`""`' if spec.default == "" else f"`{spec.default}`"
        paddlerec, doc = (cell.replace("|", "\\|") for cell in (spec.paddlerec or "not a PaddleRec key", spec.doc))
        lines.append(f"| `{key}` | {spec.type.__name__} | {spec.bounds.describe() if spec.bounds else ''} | {default} "
                     f"| {paddlerec} | {doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(runner_keys_markdown(), end="")

"""The run's settings: a PaddleRec-style YAML config as a flat dict of dotted keys, `-o key=value` overrides,
and the runner.* key table (RUNNER_DEFAULTS, printed for doc/tools.md by `python -m tools.utils.config`).

Model plugins read the config the PaddleRec way,
`config.get("hyper_parameters.n_way")`, so every YAML leaf becomes one
dotted key (lists are leaves). Tool-owned `runner.*` keys have defaults and
types in RUNNER_DEFAULTS; a plugin may add its own defaults through a
module-level CONFIG_DEFAULTS dict. An override is typed like the value it
replaces, so a typo such as `-o runner.epochs=0.5` fails loudly instead of
training for 0.5 epochs. This module must not import paddle: the entry points
load the config before Paddle starts (see environment.py).
"""
import difflib
import numbers
import os
import re
from collections import namedtuple

import yaml

from tools.utils.console import UserError

_INT_TEXT = re.compile(r"^[+-]?\d+$")
_TRUE_WORDS = {"true", "1", "yes", "on"}
_FALSE_WORDS = {"false", "0", "no", "off"}
_NONE_WORDS = {"null", "none", "~"}


def split_override(item: str):
    """'key=value' -> (key, value text). Returns None when there is no '='."""
    if "=" not in item:
        return None
    key, text = item.split("=", 1)
    return key.strip(), text


def convert_value(text: str, type_, none_allowed: bool = False):
    """Turn override text into `type_`; raises ValueError with a short reason.

    `type_` is one of bool, int, float, str, list, or None (unknown type: the
    text is read as YAML, so `-o a=3` gives 3 and `-o a=x` gives 'x').
    `none_allowed` lets keys whose default is None be reset with `null`.
    """
    stripped = text.strip()
    if none_allowed and stripped.lower() in _NONE_WORDS:
        return None
    if type_ is bool:
        word = stripped.lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise ValueError(f"expected bool (true/false/1/0/yes/no), got {text!r}")
    if type_ is int:
        if not _INT_TEXT.match(stripped):
            raise ValueError(f"expected int, got {text!r}")
        return int(stripped)
    if type_ is float:
        try:
            return float(stripped)
        except ValueError:
            raise ValueError(f"expected float, got {text!r}") from None
    if type_ is str:
        return text
    if type_ is list:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = None
        if not isinstance(value, list):
            raise ValueError(f"expected a list such as [3, 3], got {text!r}")
        return value
    # Unknown type (the key's current value is None): YAML decides, and text
    # that is not valid YAML on its own stays a plain string.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# paddlerec: how the key relates to PaddleRec's tools/trainer.py and infer.py: "same", "extended" (same meaning,
# more to it, said in the doc), NO_EFFECT + why (accepted; a warning when set), or "" (not a PaddleRec key).
RunnerKey = namedtuple("RunnerKey", ["default", "type", "doc", "paddlerec"], defaults=[""])
NO_EFFECT = "no effect here"

# The runner.* keys the tools understand. `type` drives -o typing and the
# load-time check of YAML values; a default of None means "no default" (the
# tool that needs the key raises "missing required key") or, where the doc
# says so, "derived from another key".
RUNNER_DEFAULTS = {
    "runner.use_gpu": RunnerKey(False, bool, "Run on a GPU when this Paddle build and the machine have one; else warn and use the CPU.", "extended: default False, and a GPU that is missing gives a warning and the CPU"),
    "runner.epochs": RunnerKey(1, int, "Number of training epochs (counted from 0; a resumed run continues up to this number).", "same"),
    "runner.train_batch_size": RunnerKey(None, int, "Batch size of the training loader (required for training).", "same"),
    "runner.infer_batch_size": RunnerKey(None, int, "Batch size of the evaluation loader (required for infer).", "same"),
    "runner.print_interval": RunnerKey(10, int, "Log a line and a metrics record every this many batches.", "same"),
    "runner.model_save_path": RunnerKey("output_model", str, "Folder that receives one checkpoint folder per epoch, named by the epoch number, holding rec.pdparams and rec.pdopt.", "extended: written atomically with meta.json; a relative path is relative to the config's folder (PaddleRec: the current folder)"),
    "runner.overwrite": RunnerKey(False, bool, "A fresh start (no runner.resume_path; a warm start from runner.model_init_path counts as fresh) into a runner.model_save_path that holds checkpoints is refused unless this is True; then the old run (epoch folders, metrics.jsonl, best.json, infer_metrics.jsonl) is removed, as a whole, before training starts."),
    "runner.model_init_path": RunnerKey("", str, "Warm start, as in PaddleRec: a checkpoint epoch folder whose parameters (only) the model starts from; training runs from epoch 0 with a fresh optimizer. Empty: random initialisation.", "same"),
    "runner.resume_path": RunnerKey("", str, "Continue a run: a checkpoint epoch folder (parameters + optimizer state); training continues at the next epoch, bit-identical to an uninterrupted run. auto: the newest complete epoch folder in runner.model_save_path, or a fresh start when there is none. Empty: start fresh."),
    "runner.infer_load_path": RunnerKey("", str, "Folder holding the epoch checkpoints to evaluate. Empty: runner.model_save_path.", "extended: empty means runner.model_save_path; relative to the config's folder"),
    "runner.infer_start_epoch": RunnerKey(0, int, "First checkpoint epoch evaluated by infer.", "same"),
    "runner.infer_end_epoch": RunnerKey(None, int, "Checkpoint epoch where infer stops (exclusive). Unset: runner.epochs.", "extended: unset means runner.epochs (PaddleRec: 10)"),
    "runner.infer_best": RunnerKey(False, bool, "infer evaluates only the epoch named in best.json of the infer load folder (written by training with validation), instead of runner.infer_start_epoch/runner.infer_end_epoch."),
    "runner.train_data_dir": RunnerKey(None, str, "Folder whose entries (sorted, absolute paths) are handed to the training reader.", "same"),
    "runner.test_data_dir": RunnerKey(None, str, "Folder whose entries (sorted, absolute paths) are handed to the evaluation reader.", "same"),
    "runner.train_reader_path": RunnerKey(None, str, "Reader module for training, relative to the config folder (importlib name, .py optional).", "same"),
    "runner.infer_reader_path": RunnerKey(None, str, "Reader module for evaluation, relative to the config folder (importlib name, .py optional).", "same"),
    "runner.seed": RunnerKey(2026, int, "Seed for random, numpy and paddle; each epoch reseeds from it so resumed runs match uninterrupted ones.", "extended: also seeds random and numpy, and reseeds every epoch (PaddleRec's default: 12345)"),
    "runner.deterministic": RunnerKey(True, bool, "Set FLAGS_cudnn_deterministic=1 before Paddle starts."),
    "runner.num_threads": RunnerKey(0, int, "CPU threads for Paddle; 0 means all cores (divided among the data-parallel processes of a host)."),
    "runner.metrics_path": RunnerKey("", str, "JSON-lines metrics file of a training run. Empty: metrics.jsonl inside runner.model_save_path."),
    "runner.use_fleet": RunnerKey(False, bool, "Data-parallel training and evaluation over the processes of python -m paddle.distributed.launch (see doc/distributed.md). True without a launcher is an error.", "extended: also shards evaluation and checks the ranks agree"),
    "runner.sync_timeout": RunnerKey(1800, int, "Data-parallel runs: seconds a rank waits for the others at the start of each epoch or evaluation before failing with an error naming the missing ranks (inside an epoch the backend's own limit applies, see doc/distributed.md)."),
    "runner.use_auc": RunnerKey(False, bool, "PaddleRec resets the metrics after each epoch only when True (else its infer accumulates them over the checkpoints); here they always start afresh for every epoch and every evaluated checkpoint.", "extended: always as PaddleRec with True"),
    "runner.use_visual": RunnerKey(False, bool, "Write VisualDL scalars, as PaddleRec: <config folder>/visualDL_log/train (tags train/<key>: loss, metrics, every runner.print_interval batches) and visualDL_log/infer (infer/<key>). Needs the optional visualdl package (pip install -e \".[visual]\"); view with visualdl --logdir visualDL_log.", "same"),
    "runner.use_xpu": RunnerKey(False, bool, "PaddleRec runs on a Kunlun XPU; these tools run on the CPU or a CUDA GPU only.", NO_EFFECT),
    "runner.use_npu": RunnerKey(False, bool, "PaddleRec runs on an Ascend NPU; these tools run on the CPU or a CUDA GPU only.", NO_EFFECT),
    "runner.use_inference": RunnerKey(False, bool, "PaddleRec's static-graph trainer exports an inference model; these tools save dygraph checkpoints (rec.pdparams) only.", NO_EFFECT),
    "runner.save_inference_feed_varnames": RunnerKey(None, list, "Inputs of PaddleRec's exported inference model (runner.use_inference); nothing is exported here.", NO_EFFECT),
    "runner.save_inference_fetch_varnames": RunnerKey(None, list, "Outputs of PaddleRec's exported inference model (runner.use_inference); nothing is exported here.", NO_EFFECT),
    "runner.num_workers": RunnerKey(0, int, "PaddleRec's DataLoader worker processes; here the loader reads in the main process, since readers draw seeded samples whose order workers would make depend on scheduling.", NO_EFFECT),
    "runner.thread_num": RunnerKey(None, int, "Threads of PaddleRec's static-graph QueueDataset/InMemoryDataset; there is no such dataset here (CPU threads: runner.num_threads).", NO_EFFECT),
    "runner.reader_type": RunnerKey(None, str, "PaddleRec's static-graph reader (QueueDataset, InMemoryDataset, DataLoader); here it is always a DataLoader over the reader's RecDataset.", NO_EFFECT),
    "runner.user_define_reader": RunnerKey(False, bool, "PaddleRec's flag for a reader of its own making; every reader here is the model's RecDataset.", NO_EFFECT),
    "runner.tasks_per_epoch": RunnerKey(None, int, "Read by readers: training samples or tasks per epoch (reader's own default when unset)."),
    "runner.infer_tasks": RunnerKey(None, int, "Read by readers: evaluation samples or tasks (reader's own default when unset)."),
    "runner.valid_data_dir": RunnerKey("", str, "Validation data folder, read by the evaluation reader (runner.infer_reader_path) like runner.test_data_dir. Empty: no validation during training."),
    "runner.valid_interval": RunnerKey(1, int, "Validate after every this many epochs (epochs N-1, 2N-1, ...); the last epoch is always validated."),
    "runner.valid_tasks": RunnerKey(None, int, "Validation samples or tasks; the reader sees it as runner.infer_tasks. Unset: runner.infer_tasks."),
    "runner.valid_metric": RunnerKey("acc", str, "Validation result (a key as logged, e.g. acc) that selects the best epoch, recorded in best.json of runner.model_save_path."),
    "runner.valid_mode": RunnerKey("max", str, "max: the highest runner.valid_metric is best; min: the lowest. Ties keep the earlier epoch."),
}

# Keys the loader computes; never read from YAML or -o.
COMPUTED_KEYS = ("config_abs_dir",)


def keys_without_effect(config):
    """[(key, why)] of the PaddleRec keys this config sets to something that would act in PaddleRec but not here."""
    return [(key, spec.doc) for key, spec in RUNNER_DEFAULTS.items()
            if spec.paddlerec == NO_EFFECT and config.get(key) not in (None, False, "", spec.default)]


def type_name(value) -> str:
    return "None" if value is None else type(value).__name__


def is_number(value, type_=numbers.Real) -> bool:
    """A number of `type_` (int, float, numbers.Real...) that is not a bool: YAML/JSON true is no count."""
    return isinstance(value, type_) and not isinstance(value, bool)


def check_type(value, type_):
    """Return `value` if it fits `type_`, else raise ValueError.

    bool is not accepted as an int (YAML `True` for an epoch count is a
    mistake), while an int is accepted for a float and returned as float.
    """
    if type_ is None:
        return value
    if type_ is float and is_number(value, int):
        return float(value)
    if type_ in (int, float) and isinstance(value, bool):
        raise ValueError(f"expected {type_.__name__}, got bool {value!r}")
    if not isinstance(value, type_):
        raise ValueError(f"expected {type_.__name__}, got {type_name(value)} {value!r}")
    return value


def suggest_keys(key, known, limit=3):
    """Known keys close to a mistyped `key`, best first.

    All keys share long prefixes ("runner.", "hyper_parameters."), which makes
    many of them look similar; only keep those about as close as the best.
    """
    scored = [(difflib.SequenceMatcher(None, key, other).ratio(), other) for other in known]
    scored = sorted((item for item in scored if item[0] >= 0.6), reverse=True)
    if not scored:
        return []
    best = scored[0][0]
    return [other for ratio, other in scored[:limit] if ratio >= best - 0.05]


def flatten(mapping, prefix=""):
    """{'a': {'b': 1, 'c': [1]}} -> {'a.b': 1, 'a.c': [1]}; lists are leaves."""
    flat = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


class Config(dict):
    """Flat dotted-key config; also knows its file for error messages."""

    def __init__(self, values, path):
        super().__init__(values)
        self.path = path  # as given by the user, so messages read naturally
        self.key_types = {}  # key -> type used to convert -o values
        self["config_abs_dir"] = os.path.dirname(os.path.abspath(path))

    @property
    def config_dir(self) -> str:
        return self["config_abs_dir"]

    def error(self, key_or_path, message) -> UserError:
        """A UserError '<config path>: <key_or_path>: <message>' to raise."""
        return UserError(f"{self.path}: {key_or_path}: {message}")

    def require(self, key, type_=None):
        """The value of `key`, or a UserError if it is missing or mistyped."""
        value = self.get(key)
        if value is None:
            raise self.error(key, "missing required key")
        try:
            return check_type(value, type_)
        except ValueError as reason:
            raise self.error(key, str(reason)) from None

    def resolve_path(self, key, required=True):
        """The path in `key` made absolute relative to the config's folder.

        PaddleRec semantics: relative paths in a config are relative to the
        config file, not to the current directory. An empty value counts as
        unset: UserError when required, else None.
        """
        value = self.get(key)
        if value in (None, ""):
            if required:
                raise self.error(key, "missing required key")
            return None
        value = os.path.expanduser(str(value))
        return os.path.normpath(os.path.join(self.config_dir, value))

    def known_keys(self):
        return sorted(set(self.key_types) | (set(self) - set(COMPUTED_KEYS)))

    def apply_override(self, item):
        parsed = split_override(item)
        if parsed is None or not parsed[0]:
            raise self.error(f"-o {item}", "expected key=value")
        key, text = parsed
        if key not in self.key_types:
            hint = suggest_keys(key, self.known_keys())
            suffix = f" (did you mean {', '.join(hint)}?)" if hint else ""
            raise self.error(f"-o {key}", f"unknown key{suffix}")
        runner_key = RUNNER_DEFAULTS.get(key)
        none_allowed = self.get(key) is None or (runner_key is not None and runner_key.default is None)
        try:
            self[key] = convert_value(text, self.key_types[key], none_allowed)
        except ValueError as reason:
            raise self.error(f"-o {key}", str(reason)) from None


class ConfigView(Config):
    """A copy of a config with some keys replaced, for code that reads fixed keys.

    Validation hands the evaluation reader a view in which runner.test_data_dir
    and runner.infer_tasks hold the validation settings. `aliases` maps a
    replaced key to the key the user really set, so config.error() names that.
    """

    def __init__(self, base, replacements, aliases=None):
        dict.__init__(self, base)
        self.path = base.path
        self.key_types = dict(base.key_types)
        self.update(replacements)
        self.aliases = dict(aliases or {})

    def error(self, key_or_path, message) -> UserError:
        return super().error(self.aliases.get(key_or_path, key_or_path), message)


def read_yaml_mapping(path):
    """The YAML file as a dict; every failure is a one-line UserError."""
    if not os.path.exists(path):
        raise UserError(f"{path}: config file not found")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder, expected a YAML config file")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as reason:
        detail = getattr(reason, "strerror", None) or str(reason)
        raise UserError(f"{path}: cannot read config file: {detail}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as reason:
        mark = getattr(reason, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(reason, "problem", None) or "invalid YAML"
        raise UserError(f"{path}: {where}YAML syntax error: {problem}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping of sections, got {type_name(data)}")
    return data


def _runner_value(config, key, spec):
    """Check a YAML runner value against its declared type."""
    value = config[key]
    if value is None and spec.default in (None, ""):
        return spec.default
    try:
        return check_type(value, spec.type)
    except ValueError as reason:
        raise config.error(key, str(reason)) from None


def load_config(path, overrides=(), plugin_defaults=None) -> Config:
    """Read `path`, merge defaults under it, then apply `-o key=value` items.

    Precedence, lowest first: plugin CONFIG_DEFAULTS, runner defaults, YAML,
    overrides. An override must name a key that exists in one of the first
    three, so load the plugin's defaults first (see cli.load_run_config) when plugin
    keys may be overridden. Types for -o come from RUNNER_DEFAULTS, else the
    plugin default's type, else the YAML value's type.
    """
    yaml_values = flatten(read_yaml_mapping(path))
    for key in COMPUTED_KEYS:
        yaml_values.pop(key, None)

    values = dict(plugin_defaults or {})
    values.update({key: spec.default for key, spec in RUNNER_DEFAULTS.items()})
    values.update(yaml_values)
    config = Config(values, path)

    for key, value in yaml_values.items():
        config.key_types[key] = _type_of(value)
    for key, default in (plugin_defaults or {}).items():
        if default is not None:
            config.key_types[key] = _type_of(default)
        else:
            config.key_types.setdefault(key, None)
    for key, spec in RUNNER_DEFAULTS.items():
        config.key_types[key] = spec.type
        if key in yaml_values:
            config[key] = _runner_value(config, key, spec)

    for item in overrides:
        config.apply_override(item)
    return config


def _type_of(value):
    """The type an override of this value must have (None: parse as YAML)."""
    if isinstance(value, (bool, int, float, str, list)):
        return type(value)
    return None


def _default_text(value) -> str:
    if value is None:
        return "(unset)"
    if value == "":
        return '`""`'
    return f"`{value}`"


def runner_keys_markdown() -> str:
    lines = ["| key | type | default | PaddleRec | meaning |", "| --- | --- | --- | --- | --- |"]
    for key, spec in RUNNER_DEFAULTS.items():
        doc = spec.doc.replace("|", "\\|")  # a bare | would split the table cell
        paddlerec = (spec.paddlerec or "not a PaddleRec key").replace("|", "\\|")
        lines.append(f"| `{key}` | {spec.type.__name__} | {_default_text(spec.default)} | {paddlerec} | {doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(runner_keys_markdown(), end="")

"""What a model folder gives the tools (doc/tools.md): dygraph_model.py, whose contract and defaults are ModelPlugin,
and the readers' RecDataset, read through a guarded DataLoader. Each file is imported under a unique name, its
folder first on sys.path: the plugin's `import net` finds its own."""
import functools
import hashlib
import importlib
import importlib.util
import inspect
import itertools
import math
import os
import re
import sys
import traceback

from tools.utils.console import UserError

PLUGIN_FILE = "dygraph_model.py"
_MODULE_PREFIX = "_rec_plugin_"
_module_cache = {}  # absolute path -> module


def _inside(path, folder) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _put_first_on_sys_path(folder):
    if folder in sys.path:
        sys.path.remove(folder)
    sys.path.insert(0, folder)


def import_file(path: str):
    path = os.path.abspath(path)
    if path in _module_cache:
        return _module_cache[path]
    folder = os.path.dirname(path)
    # Forget the modules another model folder imported by plain name, or this plugin's `import net` would get
    # that folder's net.py back from sys.modules (the other plugin keeps the references it holds).
    for other in {os.path.dirname(known) for known in _module_cache} - {folder}:
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None)
            if (file and not name.startswith(_MODULE_PREFIX) and not _inside(folder, other)
                    and _inside(os.path.abspath(file), other)):
                del sys.modules[name]
    _put_first_on_sys_path(folder)
    digest = hashlib.sha1(path.encode("utf-8")).hexdigest()[:10]
    name = f"{_MODULE_PREFIX}{digest}_{os.path.splitext(os.path.basename(path))[0]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    _module_cache[path] = module
    return module


def import_plugin_module(config):
    path = os.path.join(config.config_dir, PLUGIN_FILE)
    if not os.path.isfile(path):
        raise config.error(config.config_dir, f"no {PLUGIN_FILE} in the config's folder (the model plugin goes "
                           "next to the config)")
    return import_file(path)


def _keyed(value, values=object) -> bool:
    """A dict of (dotted-key) strings to `values`."""
    return isinstance(value, dict) and all(isinstance(key, str) and isinstance(item, values)
                                           for key, item in value.items())


class ModelPlugin:
    """The contract of a model plugin, PaddleRec's DygraphModel, with the defaults of what a plugin may leave out.
    A plugin need not subclass it (a model folder imports nothing from tools/, so PaddleRec's tools load it as it
    is): load_model_plugin() puts it behind the plugin's DygraphModel, and plugin_declaration() reads each module
    declaration, checked against CHECKS."""

    # Module declarations, which shape the tools since they know no model.
    CONFIG_DEFAULTS = {}  # {dotted key: default}: keys -o may set, and their types
    # [dotted key]: keys read without a default. With CONFIG_DEFAULTS and the runner table they are all the keys
    # there are: a YAML key outside them gets a warning.
    CONFIG_KEYS = []
    NON_FINITE_KEYS = {}  # {dotted key: what it is}: the settings to blame when training turns NaN or infinite
    EVALUATION_NOTE = ""  # how the plugin evaluates, in the summaries of infer and validation ({dotted.key}: value)
    BENCHMARK_VARIANTS = [{}]  # benchmark.py: the override dicts timed
    BENCHMARK_LABELS = {}  # benchmark.py: the names of its columns ({"samples": .., "kernels": ..})
    # [dotted key]: settings a checkpoint is trained for that its parameters do not show (such as how batch norm
    # normalises): recorded in its meta.json, and loading it under another value gets a warning.
    RECORDED_KEYS = []

    CHECKS = {  # what each declaration must be: (the words of the error, the check)
        "CONFIG_DEFAULTS": ("a dict of dotted-key strings to defaults", _keyed),
        "CONFIG_KEYS": ("a list of dotted-key strings",
                        lambda value: isinstance(value, (list, tuple)) and all(isinstance(key, str) for key in value)),
        "NON_FINITE_KEYS": ("a dict of dotted-key strings to descriptions", lambda value: _keyed(value, str)),
        "EVALUATION_NOTE": ("a string", lambda value: isinstance(value, str)),
        "BENCHMARK_VARIANTS": ("a list of dicts of dotted-key strings to values",
                               lambda value: isinstance(value, list) and value and all(map(_keyed, value))),
        "BENCHMARK_LABELS": ("a dict of strings", _keyed),
        "RECORDED_KEYS": ("a list of dotted-key strings",
                          lambda value: isinstance(value, (list, tuple)) and all(isinstance(key, str) for key in value)),
    }

    def create_model(self, config):
        """A paddle.nn.Layer."""
        raise self.lacks("create_model", config.config_dir)

    def create_optimizer(self, model, config):
        """A paddle.optimizer.Optimizer; an LRScheduler learning rate is stepped once per batch."""
        raise self.lacks("create_optimizer", config.config_dir)

    def create_metrics(self):
        """(metrics, names): two lists of equal length; none by default."""
        return [], []

    def train_forward(self, model, metrics, batch, config):
        """(scalar loss tensor, metrics, {name: value to log})."""
        raise self.lacks("train_forward", config.config_dir)

    def infer_forward(self, model, metrics, batch, config):
        """(metrics, {name: value to log}); the plugin chooses model.eval() or paddle.no_grad()."""
        raise self.lacks("infer_forward", config.config_dir)

    def set_epoch(self, epoch):
        """Called before each training epoch, for training that changes with the epoch."""

    def ensemble(self, models, config):
        """runner.infer_ensemble: one model made of `models`."""
        raise self.lacks("ensemble", config.config_dir)

    def predict(self, model, config, support, queries):
        """predict.py: {"classes", "probabilities", "settings", "seconds"} (doc/tools.md)."""
        raise self.lacks("predict", config.config_dir)

    def kernel_seconds(self, model, batch, config):
        """benchmark.py: (seconds, calls) of the model's compute kernels replayed bare."""
        raise self.lacks("kernel_seconds", config.config_dir)

    WHY = {"ensemble": "how models combine is up to the model", "predict": "few-shot prediction is up to the model",
           "kernel_seconds": "benchmark.py then has no kernel columns"}

    def has(self, method) -> bool:
        return getattr(type(self), method) is not getattr(ModelPlugin, method)

    def lacks(self, method, where) -> UserError:
        why = self.WHY.get(method, "the tools need it")
        return UserError(f"{where}: the model plugin's DygraphModel has no {method}() method ({why})")

    def require(self, method, where):
        """Fail early, before any work, when the plugin lacks an optional `method` a tool needs."""
        if not self.has(method):
            raise self.lacks(method, where)


def plugin_declaration(module, name):
    """The plugin module's declaration `name` checked, or ModelPlugin's default; a UserError naming the file."""
    value = getattr(module, name, None)
    if value is None:
        return getattr(ModelPlugin, name)
    what, check = ModelPlugin.CHECKS[name]
    if not check(value):
        raise UserError(f"{module.__file__}: {name} must be {what}, got {type(value).__name__}")
    return value


def load_model_plugin(config):
    """The DygraphModel of the config's plugin, with ModelPlugin's defaults behind its own methods."""
    module = import_plugin_module(config)
    plugin_class = getattr(module, "DygraphModel", None)
    if plugin_class is None:
        raise UserError(f"{module.__file__}: no class DygraphModel defined")
    return type(plugin_class.__name__, (plugin_class, ModelPlugin), {"__module__": plugin_class.__module__})()


def recorded_settings(config) -> dict:
    """{key: the run's value} of the plugin's RECORDED_KEYS, as checkpoints record them."""
    return {key: config.get(key) for key in plugin_declaration(import_plugin_module(config), "RECORDED_KEYS")}


def evaluation_note(module, config):
    """The plugin's EVALUATION_NOTE on one line, each {dotted.key} in it replaced by the run's value of the key."""
    note = " ".join(plugin_declaration(module, "EVALUATION_NOTE").split())
    return re.sub(r"\{([\w.]+)\}", lambda match: str(config.get(match.group(1))), note)


# mode -> (data folder key, batch size key, reader key); validation reads its folder with the evaluation reader.
MODE_KEYS = {
    "train": ("runner.train_data_dir", "runner.train_batch_size", "runner.train_reader_path"),
    "infer": ("runner.test_data_dir", "runner.infer_batch_size", "runner.infer_reader_path"),
    "valid": ("runner.valid_data_dir", "runner.infer_batch_size", "runner.infer_reader_path"),
}


def import_reader(config, key: str):
    """config[key]: a module file relative to the config's folder (".py" optional), else PaddleRec's importlib name."""
    value = str(config.require(key, str))
    path = os.path.normpath(os.path.join(config.config_dir, value if value.endswith(".py") else value + ".py"))
    if os.path.isfile(path):
        return import_file(path)
    _put_first_on_sys_path(config.config_dir)
    try:
        return importlib.import_module(value)
    except ModuleNotFoundError as reason:
        if reason.name and value.startswith(reason.name):
            raise config.error(key, f"no module file {path} and no importable module {value!r}") from None
        raise
    except (TypeError, ValueError):
        raise config.error(key, f"no module file {path}") from None


def list_data_files(config, dir_key):
    """Sorted absolute paths of the data folder's entries, hidden ones (.gitkeep) left out."""
    folder = config.resolve_path(dir_key)
    if not os.path.exists(folder):
        raise config.error(dir_key, f"data folder {folder} does not exist")
    if not os.path.isdir(folder):
        raise config.error(dir_key, f"{folder} is not a folder")
    try:
        entries = sorted(name for name in os.listdir(folder) if not name.startswith("."))
    except OSError as reason:  # no read permission, or the folder vanished
        raise config.error(dir_key, f"cannot read data folder {folder}: {reason.strerror}") from None
    if not entries:
        raise config.error(dir_key, f"data folder {folder} is empty")
    return [os.path.join(folder, name) for name in entries]


def create_dataset(config, mode, rank=0, world_size=1, epoch=0):
    """RecDataset(file_list, config[, mode=]) with its optional hooks set_epoch and shard applied (doc/tools.md)."""
    dir_key, _, reader_key = MODE_KEYS[mode]
    file_list = list_data_files(config, dir_key)
    reader = import_reader(config, reader_key)
    dataset_class = getattr(reader, "RecDataset", None)
    if dataset_class is None:
        raise config.error(reader_key, f"{reader.__file__} defines no class RecDataset")
    if "mode" in inspect.signature(dataset_class).parameters:
        mode = "infer" if mode == "valid" and "valid" not in tuple(getattr(dataset_class, "MODES", ())) else mode
        dataset = dataset_class(file_list, config, mode=mode)
    else:
        dataset = dataset_class(file_list, config)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    if world_size > 1:  # single-process runs leave readers untouched
        if not callable(getattr(dataset, "shard", None)):
            raise config.error(reader_key, f"{dataset_class.__module__}.RecDataset has no shard(rank, world_size) "
                               "method: every rank would read the same samples, so data-parallel runs need one")
        dataset.shard(rank, world_size)
    return dataset


def loader_batch_size(config, mode, world_size=1) -> int:
    """Samples per batch of one rank: the configured (global) batch size split evenly over the ranks."""
    batch_key = MODE_KEYS[mode][1]
    batch_size = config.require(batch_key, int)
    if batch_size % world_size:
        raise config.error(batch_key, f"{batch_size} cannot be split evenly over {world_size} data-parallel "
                           f"ranks; use a multiple of {world_size}")
    return batch_size // world_size


def create_data_loader(config, mode, rank=0, world_size=1, epoch=0):
    """A guarded DataLoader over this rank's share; no workers, whose scheduling would reorder the seeded samples."""
    batch_size = loader_batch_size(config, mode, world_size)
    dataset = create_dataset(config, mode, rank, world_size, epoch)
    return _guarded_loader_class()(dataset, f"{config.path}: {MODE_KEYS[mode][2]}", batch_size=batch_size,
                                   num_workers=0, return_list=True, drop_last=False)


@functools.lru_cache(maxsize=None)
def _guarded_loader_class():
    """Paddle reads an IterableDataset in a thread, where an exception ends only that thread and leaves the main one
    waiting for ever: the guard keeps it for the loader to raise. Built on first use, so no paddle at import."""
    import paddle
    from paddle.io.dataloader.collate import default_collate_fn

    class GuardedDataset(paddle.io.IterableDataset):
        def __init__(self, dataset):
            super().__init__()
            self.dataset, self.error = dataset, None

        def __iter__(self):
            try:
                yield from self.dataset
            except Exception as error:  # noqa: BLE001  (re-raised in the main thread by GuardedDataLoader)
                self.error = self.error or error

        def collate(self, samples):
            try:
                return default_collate_fn(samples)
            except Exception as error:  # noqa: BLE001
                self.error = self.error or error
                return None  # Paddle's reading thread ends the stream on a None batch

        def __len__(self):
            return len(self.dataset)

        def __getattr__(self, name):  # the reader's own hints (num_batches) stay visible to the tools
            if name == "dataset":
                raise AttributeError(name)
            return getattr(self.dataset, name)

    class GuardedDataLoader(paddle.io.DataLoader):
        def __init__(self, dataset, label, **options):
            self.guard, self.label = GuardedDataset(dataset), label
            super().__init__(self.guard, collate_fn=self.guard.collate, **options)

        def __iter__(self):
            self.guard.error = None
            yield from super().__iter__()
            error = self.guard.error
            if isinstance(error, UserError):
                raise error
            if error is not None:
                frame = traceback.extract_tb(error.__traceback__)[-1]
                raise UserError(f"{self.label}: the reader failed: {type(error).__name__}: {error} "
                                f"({os.path.basename(frame.filename)}, line {frame.lineno})") from None

    return GuardedDataLoader


def batches_then_none(loader):
    """The loader's batches, then None for ever: ranks keep stepping together after their own batches run out, and
    a finished paddle DataLoader iterator must not be asked again (std::future_error)."""
    return itertools.chain(loader, itertools.repeat(None))


def expected_batches(loader):
    """Batches the loader will give (the reader's `num_batches`, else from len(dataset)), or None."""
    hint = getattr(loader.dataset, "num_batches", None)
    hint = hint() if callable(hint) else hint
    if isinstance(hint, int):
        return hint
    try:
        return math.ceil(len(loader.dataset) / loader.batch_size)
    except (TypeError, AttributeError, NotImplementedError, ZeroDivisionError):
        return None


def count_samples(batch, fallback):
    """Leading size of the batch's first tensor (PaddleRec's batch size), else `fallback`."""
    items = batch.values() if isinstance(batch, dict) else [batch] if hasattr(batch, "shape") else batch
    return next((int(item.shape[0]) for item in items if getattr(item, "shape", None)), fallback)

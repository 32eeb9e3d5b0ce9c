"""Importing a model plugin (dygraph_model.py next to the config) and its readers, and what the plugin declares.
Each file is imported under a unique name, its folder first on sys.path: the plugin's `import net` finds its own.
"""
import hashlib
import importlib
import importlib.util
import os
import re
import sys

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


def import_from_config_folder(config, key: str):
    """The module config[key] names: a path relative to the config's folder (".py" optional), else an importable
    module name (PaddleRec's "importlib format")."""
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
    """The contract of a model plugin (dygraph_model.py next to the config, doc/tools.md "Plugin contract") with
    the defaults of what a plugin may leave out: the module-level declarations, which shape the tools since they
    know no model, and the optional methods of its DygraphModel (create_model, create_optimizer, create_metrics,
    train_forward and infer_forward have none). A plugin need not subclass it (a model folder imports nothing
    from tools/, so PaddleRec's tools load it as it is): plugin_declaration() reads each declaration, checked
    against CHECKS, and load_model_plugin() puts this class behind the plugin's DygraphModel."""

    # {dotted key: default}: keys -o may set and their types (environment.load_run_config).
    CONFIG_DEFAULTS = {}
    # [dotted key]: keys the plugin reads without a default (required ones). With CONFIG_DEFAULTS and the runner
    # table they are all the keys there are: a YAML key outside them gets a warning (config.warn_unknown_keys).
    CONFIG_KEYS = []
    # {dotted key: what it is}: the settings to blame when training turns NaN or infinite (metrics.NumericGuard).
    NON_FINITE_KEYS = {}
    # How the plugin evaluates, printed once by infer and validation summaries ({dotted.key}: the run's value).
    EVALUATION_NOTE = ""
    # The benchmark's variants (override dicts) and the names of its columns ({"samples": .., "kernels": ..}).
    BENCHMARK_VARIANTS = [{}]
    BENCHMARK_LABELS = {}

    # What each declaration must be: (the words of the error, the check).
    CHECKS = {
        "CONFIG_DEFAULTS": ("a dict of dotted-key strings to defaults", _keyed),
        "CONFIG_KEYS": ("a list of dotted-key strings",
                        lambda value: isinstance(value, (list, tuple)) and all(isinstance(key, str) for key in value)),
        "NON_FINITE_KEYS": ("a dict of dotted-key strings to descriptions", lambda value: _keyed(value, str)),
        "EVALUATION_NOTE": ("a string", lambda value: isinstance(value, str)),
        "BENCHMARK_VARIANTS": ("a list of dicts of dotted-key strings to values",
                               lambda value: isinstance(value, list) and value and all(map(_keyed, value))),
        "BENCHMARK_LABELS": ("a dict of strings", _keyed),
    }

    def set_epoch(self, epoch):
        """Called before each training epoch, for training that changes with the epoch; by default nothing."""

    # Optional abilities, None when the plugin has none: ensemble(models, config) (runner.infer_ensemble),
    # predict(model, config, support, queries) (predict.py), kernel_seconds(model, batch, config) (benchmark.py).
    ensemble = predict = kernel_seconds = None


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


def evaluation_note(module, config):
    """The plugin's EVALUATION_NOTE on one line, each {dotted.key} in it replaced by the run's value of the key."""
    note = " ".join(plugin_declaration(module, "EVALUATION_NOTE").split())
    return re.sub(r"\{([\w.]+)\}", lambda match: str(config.get(match.group(1))), note)

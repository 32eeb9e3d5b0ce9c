"""Importing model plugins and readers from a config's folder.

A model folder holds config.yaml, dygraph_model.py (the plugin: class
DygraphModel) and whatever it imports by plain name (`import net`), the
PaddleRec layout. Modules are imported from their file under a unique name,
so two model folders can be loaded in one process, and the folder goes
first on sys.path so the plugin's own `import net` finds its own net.py.
"""
import hashlib
import importlib
import importlib.util
import os
import sys

from tools.utils.console import UserError

PLUGIN_FILE = "dygraph_model.py"
_MODULE_PREFIX = "_rec_plugin_"
_loaded_folders = set()
_module_cache = {}


def _unique_module_name(path: str) -> str:
    digest = hashlib.sha1(path.encode("utf-8")).hexdigest()[:10]
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"{_MODULE_PREFIX}{digest}_{stem}"


def _is_inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _forget_other_folders_modules(folder: str):
    """Drop modules that another model folder imported by plain name.

    Without this, a second plugin's `import net` would get the first
    folder's net.py back from sys.modules. The first plugin keeps working:
    it holds its own references to the modules it imported.
    """
    for other in _loaded_folders - {folder}:
        if _is_inside(folder, other):
            continue
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None)
            if (file and not name.startswith(_MODULE_PREFIX)
                    and _is_inside(os.path.abspath(file), other)):
                del sys.modules[name]


def _put_first_on_sys_path(folder: str):
    if folder in sys.path:
        sys.path.remove(folder)
    sys.path.insert(0, folder)


def import_file(path: str):
    """Import the Python file at `path` (absolute) once; return the module."""
    path = os.path.abspath(path)
    if path in _module_cache:
        return _module_cache[path]
    folder = os.path.dirname(path)
    _forget_other_folders_modules(folder)
    _put_first_on_sys_path(folder)
    _loaded_folders.add(folder)
    name = _unique_module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    _module_cache[path] = module
    return module


def import_from_config_folder(config, key: str):
    """Import the module named by config[key], PaddleRec's "importlib format".

    The value is a module name or path relative to the config's folder
    ("omniglot_reader", "omniglot_reader.py", "../../datasets/x_reader"); a
    dotted name that is no file is tried with importlib as a last resort.
    """
    value = str(config.require(key, str))
    relative = value if value.endswith(".py") else value + ".py"
    path = os.path.normpath(os.path.join(config.config_dir, relative))
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


def _plugin_path(config) -> str:
    path = os.path.join(config.config_dir, PLUGIN_FILE)
    if not os.path.isfile(path):
        raise config.error(config.config_dir, f"no {PLUGIN_FILE} in the config's folder (the model plugin goes next to the config)")
    return path


def import_plugin_module(config):
    """The dygraph_model module next to the config (imported once)."""
    return import_file(_plugin_path(config))


def plugin_config_defaults(module) -> dict:
    """The plugin's CONFIG_DEFAULTS ({dotted_key: default}), or {}."""
    defaults = getattr(module, "CONFIG_DEFAULTS", None)
    if defaults is None:
        return {}
    if not isinstance(defaults, dict) or not all(isinstance(key, str) for key in defaults):
        raise UserError(f"{module.__file__}: CONFIG_DEFAULTS must be a dict of dotted-key strings to defaults")
    return dict(defaults)


def load_model_plugin(config):
    """Import dygraph_model.py from the config's folder; return DygraphModel()."""
    module = import_plugin_module(config)
    plugin_class = getattr(module, "DygraphModel", None)
    if plugin_class is None:
        raise UserError(f"{module.__file__}: no class DygraphModel defined")
    return plugin_class()


def evaluation_note(module):
    """The plugin's EVALUATION_NOTE (a string saying how it evaluates, printed once by infer and
    validation summaries), or None."""
    note = getattr(module, "EVALUATION_NOTE", None)
    if note is None:
        return None
    if not isinstance(note, str):
        raise UserError(f"{module.__file__}: EVALUATION_NOTE must be a string, got {type(note).__name__}")
    note = " ".join(note.split())
    return note or None


def non_finite_keys(module) -> dict:
    """The plugin's NON_FINITE_KEYS ({dotted config key: what it is}, the settings most likely to blame when
    training turns NaN or infinite, named by the trainer's error), or {}."""
    keys = getattr(module, "NON_FINITE_KEYS", None)
    if keys is None:
        return {}
    if not isinstance(keys, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in keys.items()):
        raise UserError(f"{module.__file__}: NON_FINITE_KEYS must be a dict of dotted-key strings to descriptions")
    return dict(keys)

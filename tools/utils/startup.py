"""The start of every tool run, in the only order that works.

1. Read the YAML and the runner.* overrides, without paddle.
2. prepare_environment(): Paddle reads FLAGS_* once, when it is imported.
3. Import the model plugin (this imports paddle) to learn its CONFIG_DEFAULTS.
4. Load the config for real, so -o is checked against YAML + runner
   defaults + plugin defaults.
5. Replace the SIGTERM handler Paddle installed at import by ours (SIGINT too).
"""
from tools.utils.cli import handle_signals
from tools.utils.config import RUNNER_DEFAULTS, keys_without_effect, load_config
from tools.utils.console import warn
from tools.utils.overrides import split_override
from tools.utils.plugin import import_plugin_module, plugin_config_defaults
from tools.utils.runtime import prepare_environment


def _runner_overrides(overrides):
    """Overrides of tool-owned keys, which can be checked before step 3."""
    selected = []
    for item in overrides:
        parsed = split_override(item)
        if parsed is None or parsed[0] in RUNNER_DEFAULTS:
            selected.append(item)  # malformed items fail early too
    return selected


def load_run_config(config_path, overrides=()):
    """(config, plugin_module) with the process environment prepared."""
    early = load_config(config_path, _runner_overrides(overrides))
    prepare_environment(early.require("runner.deterministic", bool))
    plugin_module = import_plugin_module(early)
    config = load_config(config_path, overrides, plugin_config_defaults(plugin_module))
    handle_signals()
    # PaddleRec keys are never unknown; those that cannot act here say so once.
    for key, why in keys_without_effect(config):
        warn(f"{key} = {config[key]!r} has no effect here: {why}")
    return config, plugin_module

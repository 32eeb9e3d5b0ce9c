"""What every tool does first and last: its arguments, the start of a run, signals and exit codes.

The start of every tool run (load_run_config), in the only order that works:
1. Read the YAML and the runner.* overrides, without paddle.
2. prepare_environment(): Paddle reads FLAGS_* once, when it is imported.
3. Import the model plugin (this imports paddle) to learn its CONFIG_DEFAULTS.
4. Load the config for real, so -o is checked against YAML + runner
   defaults + plugin defaults.
5. Replace the SIGTERM handler Paddle installed at import by ours (SIGINT too).
The end (run_tool): a UserError becomes one `error: ...` line and exit code 2.
"""
import argparse
import signal
import sys

from tools.utils.config import RUNNER_DEFAULTS, keys_without_effect, load_config, split_override
from tools.utils.console import (EXIT_DISTRIBUTED, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, EXIT_USER_ERROR,
                                 DistributedError, Terminated, UserError, rank_prefix, warn)
from tools.utils.environment import prepare_environment
from tools.utils.plugin import import_plugin_module, plugin_config_defaults


def config_arg_parser(description) -> argparse.ArgumentParser:
    """Parser with PaddleRec's `-m config.yaml` and repeatable `-o key=value`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-m", "--config", required=True, help="path of the model's config.yaml")
    parser.add_argument("-o", "--opt", dest="overrides", action="extend", nargs="+", default=[],
                        metavar="KEY=VALUE",
                        help="override a config key, e.g. -o runner.epochs=3 runner.seed=1 (repeatable)")
    return parser


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


_signals_received = []


def _on_signal(signum, frame):
    _signals_received.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def handle_signals():
    """Make SIGTERM end the tool like Ctrl-C (one line, exit 143), and remember which signal arrived. Call after
    `import paddle`, whose own SIGTERM handler, installed at import, prints a C++ stack dump and dies mid-write."""
    import paddle  # noqa: F401  (installs Paddle's handler now, if the plugin has not imported it yet)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def _signal_behind(error):
    """The signal that `error` comes from, or None. Paddle re-raises an exception from Python code it
    calls (a PyLayer's backward) as its own OSError, so the exception may not say: the signal received does."""
    if isinstance(error, Terminated):
        return signal.SIGTERM
    if isinstance(error, KeyboardInterrupt):
        return signal.SIGINT
    if isinstance(error, Exception) and _signals_received:
        return _signals_received[-1]
    return None


def run_tool(body, args) -> int:
    """Run body(args); turn a UserError into one `error:` line and exit code 2
    (a DistributedError: exit code 3; Ctrl-C: 130; SIGTERM: 143). In a data-parallel run the line starts
    with the rank, e.g. `[rank 1/2] error: ...`."""
    try:
        body(args)
    except UserError as error:
        sys.stdout.flush()
        print(f"{rank_prefix()}error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except DistributedError as error:
        sys.stdout.flush()
        print(f"{rank_prefix()}error: {error}", file=sys.stderr)
        return EXIT_DISTRIBUTED
    except BaseException as error:
        signum = _signal_behind(error)
        if signum is None:
            raise
        sys.stdout.flush()
        terminated = signum == signal.SIGTERM
        print(f"{rank_prefix()}error: {'terminated (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    return EXIT_OK

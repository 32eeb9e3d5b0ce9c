"""What every tool does first and last: its arguments, the start of a run (doc/tools.md, "Start-up order"),
signals and exit codes.
"""
import argparse
import signal
import sys

from tools.utils.config import RUNNER_DEFAULTS, keys_without_effect, load_config
from tools.utils.console import (ENDING_SIGNALS, EXIT_DISTRIBUTED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USER_ERROR,
                                 IGNORED_SIGNALS, DistributedError, Terminated, UserError, exit_code, hold_signals,
                                 on_ignored_signal, on_signal, rank_prefix, signals_received, warn)
from tools.utils.distributed import launched_rank
from tools.utils.environment import check_environment, prepare_environment
from tools.utils.plugin import import_plugin_module, plugin_declaration


def config_arg_parser(description) -> argparse.ArgumentParser:
    """PaddleRec's `-m config.yaml` and repeatable `-o key=value`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-m", "--config", required=True, help="path of the model's config.yaml")
    parser.add_argument("-o", "--opt", dest="overrides", action="extend", nargs="+", default=[],
                        metavar="KEY=VALUE",
                        help="override a config key, e.g. -o runner.epochs=3 runner.seed=1 (repeatable)")
    return parser


def load_run_config(config_path, overrides=(), data_parallel=False):
    """(config, plugin_module): the environment variables checked, the YAML and runner.* overrides read without
    Paddle (with `data_parallel`, the launcher's ranks checked against them), the environment prepared (Paddle
    reads it at import), the plugin imported, and the config read again with the plugin's defaults so every -o is
    checked; then our SIGTERM handler replaces the one Paddle installs at import."""
    check_environment()  # Paddle and the model read some of these at import, where a bad value is a traceback
    early = load_config(config_path, [item for item in overrides
                                      if "=" not in item or item.split("=", 1)[0].strip() in RUNNER_DEFAULTS])
    if data_parallel:
        launched_rank(early)
    prepare_environment(early.require("runner.deterministic", bool))
    plugin_module = import_plugin_module(early)
    config = load_config(config_path, overrides, plugin_declaration(plugin_module, "CONFIG_DEFAULTS"),
                         plugin_declaration(plugin_module, "CONFIG_KEYS"))
    handle_signals()
    for key, why in keys_without_effect(config):  # PaddleRec keys are never unknown; those idle here say so
        warn(f"{key} = {config[key]!r} has no effect here: {why}")
    return config, plugin_module


def handle_signals():
    """Make SIGTERM and SIGHUP end the tool like Ctrl-C (one line, exit 128 + the signal), remember which signal
    arrived, and ignore SIGUSR1/SIGUSR2 with a warning. Call after `import paddle`, whose own SIGTERM handler,
    installed at import, prints a C++ stack dump and dies mid-write."""
    import paddle  # noqa: F401  (installs Paddle's handler now, if the plugin has not imported it yet)

    for signum in ENDING_SIGNALS:
        signal.signal(signum, on_signal)
    for signum in IGNORED_SIGNALS:
        signal.signal(signum, on_ignored_signal)


def run_tool(body, args) -> int:
    """Run body(args); end a UserError with one `error:` line and exit code 2 (DistributedError: 3; Ctrl-C: 130;
    SIGTERM: 143, SIGHUP: 129). In a data-parallel run the line starts with the rank, e.g. `[rank 1/2] error: ...`."""
    try:
        body(args)
        return EXIT_OK
    except (UserError, DistributedError) as error:
        hold_signals()  # a SIGTERM now must not cut this line short
        message, code = str(error), EXIT_USER_ERROR if isinstance(error, UserError) else EXIT_DISTRIBUTED
    except BaseException as error:
        # Paddle re-raises an exception from Python code it calls (a PyLayer's backward) as its own OSError, so
        # the exception may not say which signal it comes from: the signal received does.
        if isinstance(error, KeyboardInterrupt):
            signum = error.signum if isinstance(error, Terminated) else signal.SIGINT
        elif isinstance(error, Exception) and signals_received:
            signum = signals_received[-1]
        else:
            raise
        message, code = (("interrupted", EXIT_INTERRUPTED) if signum == signal.SIGINT else
                         (f"terminated ({signal.Signals(signum).name})", exit_code(signum)))
    sys.stdout.flush()
    print(f"{rank_prefix()}error: {message}", file=sys.stderr, flush=True)
    return code

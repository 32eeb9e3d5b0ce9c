"""Command-line plumbing shared by the tools: arguments and exit codes."""
import argparse
import signal
import sys

from tools.utils.allocator import reexec_with_allocator_tunables
from tools.utils.console import rank_prefix
from tools.utils.errors import (EXIT_DISTRIBUTED, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, EXIT_USER_ERROR,
                                DistributedError, Terminated, UserError)


def config_arg_parser(description) -> argparse.ArgumentParser:
    """Parser with PaddleRec's `-m config.yaml` and repeatable `-o key=value`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-m", "--config", required=True, help="path of the model's config.yaml")
    parser.add_argument("-o", "--opt", dest="overrides", action="extend", nargs="+", default=[],
                        metavar="KEY=VALUE",
                        help="override a config key, e.g. -o runner.epochs=3 runner.seed=1 (repeatable)")
    return parser


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
    reexec_with_allocator_tunables()  # before any work: the process may be replaced
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

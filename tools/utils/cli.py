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


def _terminate(signum, frame):
    raise Terminated()


def handle_sigterm():
    """Make SIGTERM end the tool like Ctrl-C (one line, exit 143). Call after `import paddle`, whose own
    handler, installed at import, would print a C++ stack dump and die mid-write."""
    import paddle  # noqa: F401  (installs Paddle's handler now, if the plugin has not imported it yet)

    signal.signal(signal.SIGTERM, _terminate)


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
    except KeyboardInterrupt as interrupt:
        sys.stdout.flush()
        terminated = isinstance(interrupt, Terminated)
        print(f"{rank_prefix()}error: {'terminated (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    return EXIT_OK

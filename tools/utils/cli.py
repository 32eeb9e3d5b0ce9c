"""Command-line plumbing shared by the tools: arguments and exit codes."""
import argparse
import sys

from tools.utils.allocator import reexec_with_allocator_tunables
from tools.utils.console import rank_prefix
from tools.utils.errors import EXIT_DISTRIBUTED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USER_ERROR, DistributedError, UserError


def config_arg_parser(description) -> argparse.ArgumentParser:
    """Parser with PaddleRec's `-m config.yaml` and repeatable `-o key=value`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-m", "--config", required=True, help="path of the model's config.yaml")
    parser.add_argument("-o", "--opt", dest="overrides", action="extend", nargs="+", default=[],
                        metavar="KEY=VALUE",
                        help="override a config key, e.g. -o runner.epochs=3 runner.seed=1 (repeatable)")
    return parser


def run_tool(body, args) -> int:
    """Run body(args); turn a UserError into one `error:` line and exit code 2
    (a DistributedError: exit code 3). In a data-parallel run the line starts
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
    except KeyboardInterrupt:
        sys.stdout.flush()
        print(f"{rank_prefix()}error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK

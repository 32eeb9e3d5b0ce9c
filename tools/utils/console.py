"""The process every tool runs as: its arguments, the errors that end it (one `error:` line) and their exit codes,
the signals it ends or goes on by, and what the user sees: PaddleRec-style log lines, warnings, progress bars
(doc/tools.md). Data-parallel: lines start with `[rank R/N] `; only rank 0 logs and draws bars."""
import argparse
import contextlib
import ctypes
import logging
import os
import signal
import sys

from tqdm import tqdm


class ToolError(Exception):
    """An error that ends a tool with one `error:` line (other errors are bugs and keep their traceback)."""

    def __init__(self, message):
        super().__init__(" ".join(line.strip() for line in str(message).splitlines() if line.strip()))


class UserError(ToolError, ValueError):
    """A mistake the user can fix, named by file and key or path: exit 2."""


class DistributedError(ToolError):
    """A data-parallel run cannot go on (a peer rank died, hung or disagrees): exit 3."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C, so saves stay atomic."""

    def __init__(self, signum=signal.SIGTERM):
        super().__init__()
        self.signum = signum


# Exit codes (doc/tools.md); a signal that ends a tool gives 128 + its number, as shells report it.
EXIT_OK, EXIT_USER_ERROR, EXIT_DISTRIBUTED, EXIT_INTERRUPTED = 0, 2, 3, 130
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # a warning, rather than their default action: death
_rank, _world_size = 0, 1
signals_received, _holding = [], False  # while _holding, the ending signals are only recorded


def _interrupt(signum):
    global _holding
    _holding = True  # the tool is ending now: Paddle's launcher sends SIGTERM up to 3 times in a row
    # An interrupt raised inside Paddle's autograd engine (a SIGTERM mid-backward) unwinds through C++ code that
    # logs a warning line above our one-line error; from now on Paddle's glog (FLAGS_minloglevel) logs errors only.
    root = os.path.dirname(getattr(sys.modules.get("paddle"), "__file__", None) or ".")
    for library in ("base/libpaddle.so", "libs/libphi_core.so"):
        with contextlib.suppress(OSError, ValueError):
            handle = ctypes.CDLL(os.path.join(root, library), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            ctypes.c_int.in_dll(handle, "_ZN3fLI17FLAGS_minloglevelE").value = 2
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def on_signal(signum, frame):
    """The handler of ENDING_SIGNALS (the first ends the tool like Ctrl-C) and IGNORED_SIGNALS."""
    if signum in IGNORED_SIGNALS:
        warn(f"{signal.Signals(signum).name} received and ignored (the tools end on SIGTERM, SIGINT or SIGHUP)")
        return
    signals_received.append(signum)
    if not _holding:
        _interrupt(signum)


@contextlib.contextmanager
def signals_held():
    """Run the block with SIGTERM and Ctrl-C recorded, raised after it. When the block fails they stay held: the
    tool ends with that error, which a launcher's SIGTERM (sent as soon as a peer rank died) must not replace."""
    global _holding
    if _holding:
        yield
        return
    _holding, count = True, len(signals_received)
    yield
    _holding = False
    if len(signals_received) > count:
        _interrupt(signals_received[-1])


def handle_signals():
    """Install on_signal over the handler `import paddle` installs, which prints a C++ stack dump and dies
    mid-write."""
    import paddle  # noqa: F401

    for signum in ENDING_SIGNALS + IGNORED_SIGNALS:
        signal.signal(signum, on_signal)


def config_arg_parser(description) -> argparse.ArgumentParser:
    """PaddleRec's `-m config.yaml` and repeatable `-o key=value`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-m", "--config", required=True, help="path of the model's config.yaml")
    parser.add_argument("-o", "--opt", dest="overrides", action="extend", nargs="+", default=[],
                        metavar="KEY=VALUE",
                        help="override a config key, e.g. -o runner.epochs=3 runner.seed=1 (repeatable)")
    return parser


def run_tool(body, args) -> int:
    """Run body(args); end a UserError with one `error:` line and its exit code (doc/tools.md)."""
    global _holding
    try:
        body(args)
        return EXIT_OK
    except ToolError as error:
        _holding = True  # a SIGTERM now must not cut this line short
        message, code = str(error), EXIT_DISTRIBUTED if isinstance(error, DistributedError) else EXIT_USER_ERROR
    except BaseException as error:
        # Paddle re-raises an exception from Python code it calls (a PyLayer's backward) as its own OSError, so
        # the exception may not say which signal it comes from: the signal received does.
        if isinstance(error, KeyboardInterrupt):
            signum = getattr(error, "signum", signal.SIGINT)
        elif isinstance(error, Exception) and signals_received:
            signum = signals_received[-1]
        else:
            raise
        message, code = (("interrupted", EXIT_INTERRUPTED) if signum == signal.SIGINT else
                         (f"terminated ({signal.Signals(signum).name})", 128 + int(signum)))
    sys.stdout.flush()
    print(f"{rank_prefix()}error: {message}", file=sys.stderr, flush=True)
    return code


class _TqdmHandler(logging.Handler):
    """Writes with tqdm.write, so a progress bar is redrawn below the line, not torn: INFO to stdout, WARNING and
    above to stderr (looked up per record)."""

    def emit(self, record):
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except Exception:  # noqa: BLE001 (logging's own contract: a failing handler must not raise)
            self.handleError(record)


_logger = logging.getLogger("paddle_maml_tools")
if not _logger.handlers:
    _handler = _TqdmHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(message)s"))  # PaddleRec's format
    _logger.addHandler(_handler)
    _logger.setLevel(logging.INFO)
    _logger.propagate = False  # Paddle configures the root logger with its own format


def set_rank(rank: int, world_size: int):
    global _rank, _world_size
    _rank, _world_size = int(rank), int(world_size)


def rank_prefix() -> str:
    return f"[rank {_rank}/{_world_size}] " if _world_size > 1 else ""


def log(line: str):
    if _rank == 0:  # one voice per job: rank 0 speaks for all ranks
        _logger.info(f"{rank_prefix()}{line}")


def warn(message: str):
    _logger.warning(f"{rank_prefix()}{message}")


def progress_bar(total, description):
    return tqdm(total=total, desc=description, unit="batch", file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=None if _rank == 0 else True)


def format_number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_values(values: dict) -> str:
    """'loss: 1.2345, acc: 0.5000', PaddleRec's style."""
    return ", ".join(f"{key}: {format_number(value)}" for key, value in values.items())


def format_results(values: dict) -> str:
    """'acc 0.9712 ± 0.0040 (95% CI, 1000 tasks)': X with its X_ci95, and the "tasks" or "samples" count."""
    count_key = next((key for key in ("tasks", "samples") if key in values), None)
    with_interval = any(f"{key}_ci95" in values for key in values)
    parts = []
    for key, value in values.items():
        if (key.endswith("_ci95") and key[:-len("_ci95")] in values) or (key == count_key and with_interval):
            continue
        interval = values.get(f"{key}_ci95")
        detail = "95% CI" + (f", {values[count_key]} {count_key}" if count_key else "")
        parts.append(f"{key} {format_number(value)}" if interval is None else
                     f"{key} {format_number(value)} ± {format_number(interval)} ({detail})")
    return ", ".join(parts) or "no results"

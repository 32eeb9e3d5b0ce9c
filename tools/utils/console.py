"""What the user sees: log lines, warnings, progress bars, and the errors that end a tool.

Log lines and warnings go through `logging` in PaddleRec's format
(`2026-01-01 12:00:00,000 - INFO - epoch: 0, ...`; warnings at level WARNING on
stderr). Their handler writes with tqdm.write, so an active bar (on stderr) is
redrawn below them instead of being torn. Bars only appear on a terminal: in
log files and CI they would be a stream of carriage returns. Errors that end a
tool are not log lines: they are one `error: ...` line (UserError, printed by
tools/utils/cli.py with the exit codes below).

In a data-parallel run (set_rank with world_size > 1) every line starts with
`[rank R/N] `, only rank 0 logs and draws bars, and every rank still prints
its warnings and errors.
"""
import logging
import sys

from tqdm import tqdm


def one_line(message) -> str:
    """Tools print exactly one line per error; collapse stray newlines from wrapped library messages."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


class UserError(ValueError):
    """A mistake the user can fix (bad config, missing file, wrong key).

    The message is a single line that names the file and the key or path at
    fault, so the tools can print it without a traceback and exit with code 2.
    Anything else that escapes a tool is a bug and keeps its traceback.
    """

    def __init__(self, message: str):
        super().__init__(one_line(message))


class DistributedError(Exception):
    """A data-parallel run cannot go on: a peer rank died, hung or disagrees.

    Printed like a UserError (one `error:` line naming the rank), with its
    own exit code, so a job's logs say which rank gave up and why.
    """

    def __init__(self, message: str):
        super().__init__(one_line(message))


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (kill, a scheduler, a container stop): unwinds like Ctrl-C, so saves stay atomic."""


# Exit codes shared by every tool (documented in doc/tools.md).
EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_DISTRIBUTED = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what shells report for a process it ended


_rank, _world_size = 0, 1
LOG_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"  # PaddleRec's tools/trainer.py and infer.py


class _TqdmHandler(logging.Handler):
    """Writes records with tqdm.write: INFO to stdout, WARNING and above to stderr (looked up per record)."""

    def emit(self, record):
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except Exception:  # noqa: BLE001 (logging's own contract: a failing handler must not raise)
            self.handleError(record)


def _tools_logger():
    logger = logging.getLogger("paddle_maml_tools")
    if not logger.handlers:
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # Paddle configures the root logger with its own format
    return logger


_logger = _tools_logger()


def set_rank(rank: int, world_size: int):
    """Label this process's lines with its rank; ranks other than 0 stop logging."""
    global _rank, _world_size
    _rank, _world_size = int(rank), int(world_size)


def rank_prefix() -> str:
    """'[rank R/N] ' in a data-parallel run, else ''."""
    return f"[rank {_rank}/{_world_size}] " if _world_size > 1 else ""


def log(line: str):
    if _rank != 0:
        return  # one voice per job: rank 0 speaks for all ranks
    _logger.info(f"{rank_prefix()}{line}")


def warn(message: str):
    _logger.warning(f"{rank_prefix()}{message}")


def progress_bar(total, description):
    """A tqdm bar over batches; total=None gives a bar with unknown length."""
    return tqdm(total=total, desc=description, unit="batch", file=sys.stderr,
                dynamic_ncols=True, leave=False, disable=None if _rank == 0 else True)


def format_number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_values(values: dict) -> str:
    """'loss: 1.2345, acc: 0.5000' in PaddleRec's log style."""
    return ", ".join(f"{key}: {format_number(value)}" for key, value in values.items())


def format_train_line(epoch, batch_id, values, reader_cost, batch_cost, avg_samples, ips) -> str:
    """PaddleRec's per-interval training log line."""
    parts = [f"epoch: {epoch}", f"batch_id: {batch_id}"]
    if values:
        parts.append(format_values(values))
    parts += [f"avg_reader_cost: {reader_cost:.5f} sec", f"avg_batch_cost: {batch_cost:.5f} sec",
              f"avg_samples: {avg_samples:.1f}", f"ips: {ips:.1f} ins/s"]
    return ", ".join(parts)


def format_infer_values(values: dict) -> str:
    """'acc 0.9712 ± 0.0040 (95% CI, 1000 tasks)', generic for other keys.

    A key X with a companion X_ci95 is shown as a confidence interval; a
    "tasks" (or "samples") count goes into that parenthesis.
    """
    count_key = next((key for key in ("tasks", "samples") if key in values), None)
    has_interval = any(f"{key}_ci95" in values for key in values)
    parts = []
    for key, value in values.items():
        if key.endswith("_ci95") and key[:-len("_ci95")] in values:
            continue
        if key == count_key and has_interval:
            continue
        interval = values.get(f"{key}_ci95")
        if interval is None:
            parts.append(f"{key} {format_number(value)}")
            continue
        detail = "95% CI" + (f", {values[count_key]} {count_key}" if count_key else "")
        parts.append(f"{key} {format_number(value)} ± {format_number(interval)} ({detail})")
    return ", ".join(parts)

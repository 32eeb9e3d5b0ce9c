"""Console output that coexists with tqdm progress bars.

Log lines go to stdout through tqdm.write, so an active bar (on stderr) is
redrawn below them instead of being torn. Warnings are single
`warning: ...` lines on stderr. Bars only appear on a terminal: in log
files and CI they would be a stream of carriage returns.
"""
import sys

from tqdm import tqdm


def log(line: str):
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def warn(message: str):
    tqdm.write(f"warning: {message}", file=sys.stderr)
    sys.stderr.flush()


def progress_bar(total, description):
    """A tqdm bar over batches; total=None gives a bar with unknown length."""
    return tqdm(total=total, desc=description, unit="batch", file=sys.stderr,
                dynamic_ncols=True, leave=False, disable=None)


def format_number(value) -> str:
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


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

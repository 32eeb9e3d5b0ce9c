"""Draw the learning curve of a run into a PNG (Pillow only).

    python tools/plot_metrics.py output/metrics.jsonl [output/infer_metrics.jsonl] [-o curve.png]

Plots the "train" records' loss and acc against the global step, one panel
per key, and "infer" records (evaluation of epoch checkpoints) as points
with their 95% interval when X_ci95 is present, placed at the step where
that epoch ended. Other keys can be chosen with --keys.
"""
import argparse
import os
import sys


if not __package__:  # run as a script, not imported as tools.<name>
    import _repo_path  # noqa: F401  (puts the repository root, not tools/, on sys.path)

from tools.utils.chart import Panel, Series, render_chart  # noqa: E402
from tools.utils.cli import run_tool  # noqa: E402
from tools.utils.console import log, warn  # noqa: E402
from tools.utils.errors import UserError  # noqa: E402
from tools.utils.metrics_log import read_metrics  # noqa: E402

DEFAULT_KEYS = ("loss", "acc")
EVALUATION_EVENTS = ("infer", "eval", "valid")


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def epoch_end_steps(records):
    """{epoch: global step at its end} from "epoch" records (last one wins)."""
    return {record["epoch"]: record["step"] for record in records
            if record["event"] == "epoch" and _number(record.get("epoch")) and _number(record.get("step"))}


def train_series(records, key):
    points = [(record["step"], record[key]) for record in records
              if record["event"] == "train" and _number(record.get("step")) and _number(record.get(key))]
    return Series(f"train {key}", points) if points else None


def evaluation_series(records, key, steps):
    """Evaluation points of `key` at the step where their epoch ended."""
    points, errors, unplaced = [], [], 0
    for record in records:
        if record["event"] not in EVALUATION_EVENTS or not _number(record.get(key)):
            continue
        step = record.get("step", steps.get(record.get("epoch")))
        if not _number(step):
            unplaced += 1
            continue
        points.append((step, record[key]))
        errors.append(record.get(f"{key}_ci95") if _number(record.get(f"{key}_ci95")) else 0.0)
    if unplaced:
        warn(f"{unplaced} evaluation record(s) of {key} skipped: no epoch record tells their step")
    if not points:
        return None
    label = f"eval {key}" + (" (95% CI)" if any(errors) else "")
    return Series(label, points, style="points", errors=errors)


def build_panels(records, keys):
    steps = epoch_end_steps(records)
    panels = []
    for key in keys:
        series = [item for item in (train_series(records, key), evaluation_series(records, key, steps)) if item]
        if series:
            panels.append(Panel(key, series))
    return panels


def plot(args):
    records = []
    for path in args.metrics_files:
        records += read_metrics(path)
    panels = build_panels(records, args.keys)
    if not panels:
        raise UserError(f"{args.metrics_files[0]}: no train or evaluation records with {', '.join(args.keys)} to plot")
    output = args.output or os.path.splitext(args.metrics_files[0])[0] + ".png"
    title = args.title or f"Learning curve: {os.path.abspath(args.metrics_files[0])}"
    try:
        render_chart(output, title, panels, xlabel="step (batches)")
    except OSError as reason:
        raise UserError(f"{output}: cannot write PNG: {reason.strerror or reason}") from None
    log(f"wrote {output}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Plot loss/accuracy curves from metrics JSON-lines files.")
    parser.add_argument("metrics_files", nargs="+", metavar="metrics.jsonl",
                        help="metrics file(s) of a run; add infer_metrics.jsonl for evaluation points")
    parser.add_argument("-o", "--output", help="PNG to write (default: next to the first file, .png)")
    parser.add_argument("--keys", nargs="+", default=list(DEFAULT_KEYS), help="record keys to plot, one panel each")
    parser.add_argument("--title", help="chart title")
    return run_tool(plot, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""Draw the learning curve of a run into a PNG with matplotlib (optional extra: pip install -e ".[plot]").

    python tools/plot_metrics.py output/metrics.jsonl [output/infer_metrics.jsonl] [-o curve.png] [--keys loss acc]

One panel per key: "train" records as a line against the global step, evaluation records ("infer", "valid") as
points with their 95% interval (X_ci95) at the step where their epoch ended (from the "epoch" records).
"""
import argparse
import os
import sys

if not __package__:  # run as a script, not imported as tools.<name>
    import _repo_path  # noqa: F401  (puts the repository root, not tools/, on sys.path)

from tools.utils.checkpoint import check_output_file, read_file  # noqa: E402
from tools.utils.config import is_number  # noqa: E402
from tools.utils.console import UserError, log, run_tool, warn  # noqa: E402
from tools.utils.metrics import read_metrics  # noqa: E402

EVALUATION_EVENTS = ("infer", "eval", "valid")


def panel_points(records, key):
    """([(step, value)] of the train records, [(step, value, ci95 or 0)] of the evaluation records)."""
    epoch_ends = {record["epoch"]: record["step"] for record in records  # the last "epoch" record of an epoch wins
                  if record["event"] == "epoch" and is_number(record.get("epoch")) and is_number(record.get("step"))}
    train, evaluation, unplaced = [], [], 0
    for record in records:
        value = record.get(key)
        if record["event"] == "train" and is_number(value) and is_number(record.get("step")):
            train.append((record["step"], value))
        elif record["event"] in EVALUATION_EVENTS and is_number(value):
            step, interval = record.get("step", epoch_ends.get(record.get("epoch"))), record.get(f"{key}_ci95")
            if is_number(step):
                evaluation.append((step, value, interval if is_number(interval) else 0.0))
            else:
                unplaced += 1
    if unplaced:
        warn(f"{unplaced} evaluation record(s) of {key} skipped: no epoch record tells their step")
    return train, evaluation


def build_figure(records, keys, title):
    """A matplotlib Figure with one panel per key that has data, or None."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    panels = [(key, *panel_points(records, key)) for key in keys]
    panels = [panel for panel in panels if panel[1] or panel[2]]
    if not panels:
        return None
    figure = Figure(figsize=(8, 3 * len(panels)), dpi=100, layout="constrained")
    figure.suptitle(title, fontsize=9)
    for axes, (key, train, evaluation) in zip(figure.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        if train:
            axes.plot(*zip(*train), label=f"train {key}")
        if evaluation:
            x, y, errors = zip(*evaluation)
            label = f"eval {key}" + (" (95% CI)" if any(errors) else "")
            axes.errorbar(x, y, yerr=errors, fmt="o", capsize=3, label=label)
        axes.set(xlabel="step (batches)", ylabel=key)
        axes.grid(alpha=0.3)
        axes.legend()
    return figure


def plot(args):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError('plot_metrics.py needs the optional package matplotlib: pip install -e ".[plot]" '
                        "(or pip install matplotlib)") from None
    records = [record for path in args.metrics_files for record in read_metrics(path)]
    title = args.title or f"Learning curve: {os.path.abspath(args.metrics_files[0])}"
    figure = build_figure(records, args.keys, title)
    if figure is None:
        raise UserError(f"{args.metrics_files[0]}: no train or evaluation records with {', '.join(args.keys)} to plot")
    output = args.output or os.path.splitext(args.metrics_files[0])[0] + ".png"
    check_output_file(output, "PNG", "-o", lambda path: read_file(path, "PNG", 7)[:8] == b"\x89PNG\r\n\x1a\n")
    try:
        figure.savefig(output, format="png")
    except OSError as reason:
        raise UserError(f"{output}: cannot write PNG: {reason.strerror or reason}") from None
    log(f"wrote {output}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Plot loss/accuracy curves from metrics JSON-lines files.")
    parser.add_argument("metrics_files", nargs="+", metavar="metrics.jsonl",
                        help="metrics file(s) of a run; add infer_metrics.jsonl for evaluation points")
    parser.add_argument("-o", "--output", help="PNG to write (default: next to the first file, .png)")
    parser.add_argument("--keys", nargs="+", default=["loss", "acc"], help="record keys to plot, one panel each")
    parser.add_argument("--title", help="chart title")
    return run_tool(plot, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

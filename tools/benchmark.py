"""Time training steps of a model plugin, one variant per child process, and print a comparison.

    python tools/benchmark.py -m models/multitask/maml/config.yaml [-o key=value ...] [--iterations 5]

Each variant (the plugin's BENCHMARK_VARIANTS, a list of override dicts; one plain run if absent) runs in a
fresh process so its peak memory is its own. A timed iteration is exactly the trainer's step:
train_forward, backward, optimizer step, on one fixed batch (reader time excluded), after a warm-up.
If the plugin has `kernel_seconds(model, batch, config)`, the same compute kernels are replayed bare in the
same process, and their share of the iteration time is reported: what is left is overhead we own.
The plugin may name what its samples and kernels are with BENCHMARK_LABELS, e.g. {"samples": "tasks",
"kernels": "conv"} (defaults: "samples", "kernel"); the tool knows no model.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

if not __package__:  # run as a script, not imported as tools.<name>
    import _repo_path  # noqa: F401  (puts the repository root, not tools/, on sys.path)

from tools.utils.cli import config_arg_parser, run_tool  # noqa: E402
from tools.utils.console import UserError  # noqa: E402


def measure(args):
    """Child process: time one variant and print one JSON line."""
    from tools.utils.cli import load_run_config

    config, _ = load_run_config(args.config, args.overrides)

    from tools.utils.data import create_data_loader
    from tools.utils.environment import cpu_thread_count, seed_everything, select_device
    from tools.utils.plugin import load_model_plugin

    device = select_device(config)
    seed_everything(config.require("runner.seed", int))
    plugin = load_model_plugin(config)
    model = plugin.create_model(config)
    optimizer = plugin.create_optimizer(model, config)
    metrics, _ = plugin.create_metrics()
    batch = next(iter(create_data_loader(config, "train")))

    def step():
        loss, _, _ = plugin.train_forward(model, metrics, batch, config)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        float(loss)  # wait for the result

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.iterations):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    result = {"seconds": statistics.median(times), "all_seconds": times, "device": device,
              "samples": int(config.get("runner.train_batch_size")),
              "threads": cpu_thread_count(config)}
    if hasattr(plugin, "kernel_seconds"):
        result["kernel_seconds"], result["kernel_calls"] = plugin.kernel_seconds(model, batch, config)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("BENCHMARK " + json.dumps(result))


def compare(args):
    """Parent process: run every variant in a child and print the table."""
    from tools.utils.cli import load_run_config

    _, plugin_module = load_run_config(args.config, args.overrides)  # validates config and overrides first
    variants = getattr(plugin_module, "BENCHMARK_VARIANTS", [{}])
    labels = {"samples": "samples", "kernels": "kernel", **getattr(plugin_module, "BENCHMARK_LABELS", {})}
    per_second, kernel_s, kernel_share = f"{labels['samples']}/s", f"{labels['kernels']} s", f"{labels['kernels']} %"
    rows = []
    for variant in variants:
        extra = [f"{k}={v}" for k, v in variant.items()]
        command = [sys.executable, os.path.abspath(__file__), "--child", "-m", args.config,
                   "--iterations", str(args.iterations), "--warmup", str(args.warmup)]
        if args.overrides or extra:
            command += ["-o", *args.overrides, *extra]
        label = " ".join(extra) or "(config as is)"
        print(f"running {label} ...", flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [l for l in done.stdout.splitlines() if l.startswith("BENCHMARK ")]
        if done.returncode != 0 or not lines:
            sys.stderr.write(done.stderr)
            raise UserError(f"{args.config}: benchmark of {label} failed (exit {done.returncode})")
        rows.append((label, json.loads(lines[-1][len("BENCHMARK "):])))
    base = rows[0][1]["seconds"]
    print(f"\nmedian of {args.iterations} iterations after {args.warmup} warm-up, device "
          f"{rows[0][1]['device']}, {rows[0][1]['threads']} CPU threads")
    print(f"{'variant':38s} {'s/iter':>8s} {per_second:>8s} {'vs first':>8s} {'peak MB':>8s} {kernel_s:>7s} "
          f"{kernel_share:>7s}")
    for label, r in rows:
        kernel = r.get("kernel_seconds")
        share = f"{100 * kernel / r['seconds']:6.1f}%" if kernel is not None else "     -"
        ktext = f"{kernel:7.3f}" if kernel is not None else "      -"
        print(f"{label:38s} {r['seconds']:8.3f} {r['samples'] / r['seconds']:8.2f} {r['seconds'] / base:7.2f}x "
              f"{r['peak_rss_mb']:8.0f} {ktext} {share}")
        print(f"{'':38s} all: {', '.join(f'{t:.3f}' for t in r['all_seconds'])}")


def main():
    parser = config_arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be >= 1 and --warmup >= 0")
    return run_tool(measure if args.child else compare, args)


if __name__ == "__main__":
    sys.exit(main())

"""Time training steps of a model plugin, one variant per child process, and print a comparison.

    python tools/benchmark.py -m models/multitask/maml/config.yaml [-o key=value ...] [--iterations 5]

Each of the plugin's BENCHMARK_VARIANTS (override dicts) runs in a fresh process, so its peak memory is its own; an
iteration is the trainer's step on one fixed batch. A plugin's kernel_seconds(model, batch, config) gives the time
of its compute kernels replayed bare (the rest is overhead); BENCHMARK_LABELS names the columns. With --peer DIR,
the commands of benchmark_peer.json next to the config (one per variant, run in DIR) time another implementation of
the same workload in the same run, for a "vs peer" ratio.
"""
import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

if not __package__:  # run as a script, not imported as tools.<name>
    import _repo_path  # noqa: F401  (puts the repository root, not tools/, on sys.path)

from tools.utils.checkpoint import read_json_object  # noqa: E402
from tools.utils.console import UserError, config_arg_parser, run_tool  # noqa: E402
from tools.utils.distributed import single_process  # noqa: E402
from tools.utils.environment import cpu_thread_count, load_run_config, seed_everything, select_device  # noqa: E402
from tools.utils.plugin import create_data_loader, load_model_plugin, plugin_declaration  # noqa: E402


def training_step_on_one_batch(config):
    """(plugin, model, the first training batch, step()) for a loaded config, its device selected and seeded:
    step() is the trainer's step (forward, backward, optimizer) on that batch. doc/measure/ uses it too."""
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

    return plugin, model, batch, step


def measure(args):
    """Child process: time one variant and print one JSON line."""
    config, _ = load_run_config(args.config, args.overrides)
    single_process("benchmark.py", config)
    device = select_device(config)
    seed_everything(config["runner.seed"])
    plugin, model, batch, step = training_step_on_one_batch(config)
    times = []
    for iteration in range(args.warmup + args.iterations):
        start = time.perf_counter()
        step()
        if iteration >= args.warmup:
            times.append(time.perf_counter() - start)
    result = {"seconds": statistics.median(times), "all_seconds": times, "device": device,
              "samples": int(config.get("runner.train_batch_size")), "threads": cpu_thread_count(config)}
    if plugin.has("kernel_seconds"):
        result["kernel_seconds"], result["kernel_calls"] = plugin.kernel_seconds(model, batch, config)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("BENCHMARK " + json.dumps(result))


def run(command, shown, where, what, pattern, cwd=None):
    """The last match of `pattern` in what `command` prints; a UserError naming `where` when it fails."""
    print(f"running {shown} ...", flush=True)
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except OSError as exc:
        raise UserError(f"{where}: cannot run {what} ({exc})") from None
    found = re.findall(pattern, done.stdout)
    if done.returncode != 0 or not found:
        sys.stderr.write(done.stderr[-3000:])
        raise UserError(f"{where}: the {what} failed (exit {done.returncode}) or printed no time")
    return found[-1]


def run_variant(args, variant):
    """(label, the child's result) of one variant of the config."""
    extra = [f"{key}={value}" for key, value in variant.items()]
    command = [sys.executable, os.path.abspath(__file__), "--child", "-m", args.config,
               "--iterations", str(args.iterations), "--warmup", str(args.warmup)]
    label = " ".join(extra) or "(config as is)"
    found = run(command + (["-o", *args.overrides, *extra] if args.overrides or extra else []), label, args.config,
                f"benchmark of {label}", r"(?m)^BENCHMARK (.*)$")
    return label, json.loads(found)


PEER_FILE = "benchmark_peer.json"


def load_peer(config):
    """benchmark_peer.json in the config's folder (doc/tools.md), checked."""
    path = os.path.join(config.config_dir, PEER_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{config.path}: --peer given, but there is no {PEER_FILE} next to the config")
    return read_json_object(path, "peer description", [
        *((key, lambda value: isinstance(value, str), "a string") for key in ("label", "config", "seconds")),
        ("commands", lambda value: isinstance(value, list) and all(isinstance(c, list) for c in value),
         "a list of argument lists")])


def compare(args):
    """Parent process: run every variant in a child and print the table."""
    config, plugin_module = load_run_config(args.config, args.overrides)  # checks the config and overrides first
    single_process("benchmark.py", config)
    labels = {"samples": "samples", "kernels": "kernel", **plugin_declaration(plugin_module, "BENCHMARK_LABELS")}
    variants = plugin_declaration(plugin_module, "BENCHMARK_VARIANTS")
    peer = load_peer(config) if args.peer else None
    if peer and len(peer["commands"]) != len(variants):
        raise UserError(f"{args.config}: {PEER_FILE} has {len(peer['commands'])} command(s) "
                        f"for {len(variants)} BENCHMARK_VARIANTS; it needs one per variant")
    if peer and os.path.basename(args.config) != peer["config"]:
        print(f"note: the peer times the workload of {peer['config']}; {args.config} may differ", flush=True)
    rows = []
    for index, variant in enumerate(variants):
        rows.append(run_variant(args, variant))
        if peer:  # right after our run of the same variant: the machine's speed drifts over minutes
            command = [part.format(iterations=args.iterations) for part in peer["commands"][index]]
            rows[-1][1]["peer_seconds"] = float(run(command, f"peer: {' '.join(command)}", args.peer, "peer command",
                                                    peer["seconds"], args.peer))
    base, first = rows[0][1]["seconds"], rows[0][1]
    print(f"\nmedian of {args.iterations} iterations after {args.warmup} warm-up, device {first['device']}, "
          f"{first['threads']} CPU threads")
    width = max([len("variant")] + [len(label) for label, _ in rows])  # the variant column fits its labels
    print(f"{'variant':{width}s} {'s/iter':>8s} {labels['samples'] + '/s':>8s} {'vs first':>8s} {'peak MB':>8s} "
          f"{labels['kernels'] + ' s':>7s} {labels['kernels'] + ' %':>7s}"
          + (f" {peer['label'] + ' s':>8s} {'vs peer':>8s}" if peer else ""))
    for label, r in rows:
        kernel = r.get("kernel_seconds")
        kernel_text = "      -      -" if kernel is None else f"{kernel:7.3f} {100 * kernel / r['seconds']:6.1f}%"
        peer_text = (f" {r['peer_seconds']:8.3f} {r['seconds'] / r['peer_seconds']:7.2f}x" if peer else "")
        print(f"{label:{width}s} {r['seconds']:8.3f} {r['samples'] / r['seconds']:8.2f} {r['seconds'] / base:7.2f}x "
              f"{r['peak_rss_mb']:8.0f} {kernel_text}{peer_text}")
        print(f"{'':{width}s} all: {', '.join(f'{t:.3f}' for t in r['all_seconds'])}")


def main():
    parser = config_arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--peer", metavar="DIR", help=f"also time the commands of {PEER_FILE} by the config, in DIR")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be >= 1 and --warmup >= 0")
    return run_tool(measure if args.child else compare, args)


if __name__ == "__main__":
    sys.exit(main())

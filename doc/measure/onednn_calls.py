"""Time every oneDNN call of one MAML meta-iteration on the main thread, by kind (doc/performance.md). Run from the
repository root, nothing else running:

    python doc/measure/onednn_calls.py -m models/multitask/maml/config_paddlerec.yaml -o hyper_parameters.first_order=True

One warm-up meta-iteration, then one timed: its wall time, then per kind of primitive (convolution forward /
backward-data / backward-weights, batch norm, pooling, layout changes, ...) the seconds spent inside oneDNN on the
main thread and the number of calls. A split convolution's other half runs on a second thread and is not counted.
"""
import argparse
import collections
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models" / "multitask" / "maml"))

from tools.benchmark import training_step_on_one_batch  # noqa: E402
from tools.utils.console import run_tool  # noqa: E402
from tools.utils.environment import load_run_config, seed_everything, select_device  # noqa: E402


def primitive_names(onednn_conv, onednn_layers):
    """{id(primitive): kind} for the primitives created so far. Unnamed reorders are the ones a convolution
    makes of an argument oneDNN wants in another layout: the weights (activations are already blocked)."""
    names = {}
    for key, found in onednn_layers._primitives.items():
        found = found if isinstance(found, tuple) else (found,)
        for part, primitive in zip(("forward", "backward") if key[0] in ("bn", "pool") else ("",), found):
            if primitive is not None:
                kind = {"reorder": "activation layout change"}.get(key[0], key[0])
                names[id(primitive)] = f"{kind} {part}" if part else kind
    for found in onednn_conv._primitives.values():
        if isinstance(found, tuple):
            for kind, primitive in zip(("conv forward", "conv backward data", "conv backward weights"), found):
                names[id(primitive)] = kind
    return names


def measure(args):
    config, _ = load_run_config(args.config, args.overrides)
    select_device(config)
    seed_everything(config.require("runner.seed", int))
    _, _, _, step = training_step_on_one_batch(config)
    from maml_kernels import onednn_conv, onednn_layers

    step()
    names = primitive_names(onednn_conv, onednn_layers)
    seconds, calls = collections.Counter(), collections.Counter()
    execute = onednn_conv._Primitive.execute

    def timed_execute(self, exec_args):
        start = time.perf_counter()
        execute(self, exec_args)
        if threading.current_thread() is threading.main_thread():
            kind = names.get(id(self), "weight layout change" if hasattr(self, "source") else "other")
            seconds[kind] += time.perf_counter() - start
            calls[kind] += 1

    onednn_conv._Primitive.execute = timed_execute
    start = time.perf_counter()
    step()
    print(f"meta-iteration: {time.perf_counter() - start:.3f} s; inside oneDNN on the main thread: "
          f"{sum(seconds.values()):.3f} s in {sum(calls.values())} calls")
    for kind, value in seconds.most_common():
        print(f"  {kind:24s} {value * 1e3:8.1f} ms {calls[kind]:6d} calls")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-m", "--config", required=True)
    parser.add_argument("-o", "--opt", nargs="+", action="extend", default=[], dest="overrides")
    sys.exit(run_tool(measure, parser.parse_args()))  # a bad config or key: one error line, exit 2

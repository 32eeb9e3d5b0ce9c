"""A tool's start-up (load_run_config): the environment variables checked and prepared before Paddle reads them at
import (paddle is imported in functions), then the plugin, the device, CPU threads, seeds.
"""
import os
import random
import re
import warnings
from collections import namedtuple

from tools.utils.config import RUNNER_DEFAULTS, THREADS, Bounds, keys_without_effect, load_config
from tools.utils.console import UserError, handle_signals, warn
from tools.utils.distributed import launched_rank
from tools.utils.plugin import import_plugin_module, plugin_declaration

# Variables that change how Paddle computes (set here, by the user or by the model plugin), recorded in the
# metrics file's start record so a run shows what its process really ran with.
ENVIRONMENT_VARIABLES = ("FLAGS_cudnn_deterministic", "MKL_DEBUG_CPU_TYPE", "GLIBC_TUNABLES")

# The variables the project reads, each with its range (the integer it holds, or the choices of its text), checked
# before Paddle and the model read them at import. `python -m tools.utils.environment` prints it for doc/tools.md.
Variable = namedtuple("Variable", ["bounds", "reader", "doc"])
ENVIRONMENT_TABLE = {
    "PADDLE_TRAINER_ID": Variable(Bounds(0, 2 ** 31 - 1), "Paddle, the tools (distributed.py)", "This process's rank in a data-parallel job, set by paddle.distributed.launch; below PADDLE_TRAINERS_NUM."),
    "PADDLE_TRAINERS_NUM": Variable(Bounds(1, 2 ** 31 - 1), "Paddle, the tools (distributed.py)", "Number of ranks of a data-parallel job, set by paddle.distributed.launch."),
    "PADDLE_LOCAL_SIZE": Variable(Bounds(1, 2 ** 31 - 1), "the tools (environment.py)", "Ranks on this host, set by paddle.distributed.launch; runner.num_threads=0 shares the cores among them."),
    "MAML_CONV_THREADS": Variable(Bounds(1, THREADS.high, THREADS.text), "the MAML model (cpu_schedule.py)", "Threads a MAML convolution on the CPU is split over (default: 2, or 1 on one CPU); 1 turns the split off."),
    "MAML_ONEDNN": Variable(Bounds(choices=("0", "1")), "the MAML model (onednn_conv.py)", "0: the MAML model's convolutions use Paddle's kernels instead of oneDNN's (default 1)."),
    "MAML_ONEDNN_BLOCKED": Variable(Bounds(choices=("0", "1")), "the MAML model (double_grad_ops.py)", "0: the MAML model keeps activations in the plain NCHW layout instead of oneDNN's blocked one (default 1)."),
    "XDG_CACHE_HOME": Variable(None, "the MAML reader (omniglot_reader.py)", "Folder of the MAML reader's second decoded-image cache (paddlerec_maml/ inside it), used when the data folder's own .cache cannot be written; unset or empty: ~/.cache."),
}


def check_environment(environ=None):
    """The values of the variables of ENVIRONMENT_TABLE that are set, each checked; a UserError naming the first bad
    one. Call before `import paddle`."""
    environ, values = os.environ if environ is None else environ, {}
    for name, spec in ENVIRONMENT_TABLE.items():
        if name in environ and spec.bounds is not None:
            text = environ[name]
            value = text if spec.bounds.choices else int(text) if re.fullmatch(r"\s*-?[0-9]+\s*", text) else None
            problem = f"expected an integer, got {text!r}" if value is None else spec.bounds.problem(value)
            if problem:
                raise UserError(f"environment variable {name}: {problem}")
            values[name] = value
    rank, size = values.get("PADDLE_TRAINER_ID"), values.get("PADDLE_TRAINERS_NUM")
    if rank is not None and size is not None and rank >= size:
        raise UserError(f"environment variable PADDLE_TRAINER_ID: must be below PADDLE_TRAINERS_NUM={size}, got {rank}")
    return values


def environment_markdown() -> str:
    lines = ["| variable | range | read by | meaning |", "| --- | --- | --- | --- |"]
    for name, spec in ENVIRONMENT_TABLE.items():
        lines.append(f"| `{name}` | {spec.bounds.describe() if spec.bounds else 'a folder'} | {spec.reader} | "
                     f"{spec.doc} |")
    return "\n".join(lines) + "\n"


def prepare_environment(deterministic: bool):
    if deterministic:  # PaddleRec's switch: deterministic cuDNN algorithms (CPU kernels are deterministic already)
        os.environ["FLAGS_cudnn_deterministic"] = "1"
    # Paddle warns about a missing ccache on every import (it matters only when compiling C++ extensions); it
    # would bury the tools' one-line warnings and errors on stderr.
    warnings.filterwarnings("ignore", message=r"No ccache found")


def load_run_config(config_path, overrides=(), data_parallel=False):
    """(config, plugin_module) in doc/tools.md's start-up order: no Paddle until the environment, the YAML and the
    runner.* overrides (with `data_parallel`, the launcher's ranks too) are checked; then the plugin, the config
    again with its defaults so every -o is checked, and our SIGTERM handler over the one Paddle installs."""
    check_environment()
    early = load_config(config_path, [item for item in overrides
                                      if "=" not in item or item.split("=", 1)[0].strip() in RUNNER_DEFAULTS])
    if data_parallel:
        launched_rank(early)
    prepare_environment(early["runner.deterministic"])
    plugin_module = import_plugin_module(early)
    config = load_config(config_path, overrides, plugin_declaration(plugin_module, "CONFIG_DEFAULTS"),
                         plugin_declaration(plugin_module, "CONFIG_KEYS"))
    handle_signals()
    for key, why in keys_without_effect(config):  # PaddleRec keys are never unknown; those idle here say so
        warn(f"{key} = {config[key]!r} has no effect here: {why}")
    return config, plugin_module


def environment_snapshot() -> dict:
    return {name: os.environ.get(name) for name in ENVIRONMENT_VARIABLES}


def seed_everything(seed: int):
    import numpy as np
    import paddle

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    paddle.seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """Epoch k draws the same random numbers whether or not the run was resumed before it; the odd multiplier keeps
    epoch seeds away from the seed the model was initialised with."""
    return (seed * 1_000_003 + (epoch + 1) * 7_919) % (2 ** 31 - 1)


def cpu_thread_count(config) -> int:
    """runner.num_threads, 0 meaning all cores shared evenly by the data-parallel ranks of this host."""
    ranks = int(os.environ.get("PADDLE_LOCAL_SIZE", 1)) if config.get("runner.use_fleet") else 1
    return config["runner.num_threads"] or max(1, (os.cpu_count() or 1) // ranks)


def select_device(config) -> str:
    """Paddle's device (and CPU threads) set; a GPU the build or machine lacks is a warning: configs travel."""
    import paddle

    device = "cpu"
    if config.get("runner.use_gpu"):
        if not paddle.is_compiled_with_cuda():
            warn("runner.use_gpu is True but this Paddle build has no CUDA; running on CPU")
        elif paddle.device.cuda.device_count() < 1:
            warn("runner.use_gpu is True but no GPU is visible; running on CPU")
        else:
            device = "gpu"
    paddle.set_device(device)
    from paddle.base import core
    core.set_num_threads(cpu_thread_count(config))
    return device


if __name__ == "__main__":
    print(environment_markdown(), end="")

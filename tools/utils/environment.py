"""The process a tool runs in: environment variables Paddle reads at start, the device, CPU threads, seeds.
Paddle reads its FLAGS_* once, at import: prepare_environment() runs first, and paddle is imported in functions.
"""
import os
import random
import sys
import warnings

from tools.utils.console import warn

# Variables that change how Paddle computes (set here, by the user or by the model plugin), recorded in the
# metrics file's start record so a run shows what its process really ran with.
ENVIRONMENT_VARIABLES = ("FLAGS_cudnn_deterministic", "MKL_DEBUG_CPU_TYPE", "GLIBC_TUNABLES")


def prepare_environment(deterministic: bool):
    if "paddle" in sys.modules:
        warnings.warn("prepare_environment() called after paddle was imported; "
                      "FLAGS_cudnn_deterministic may be ignored", RuntimeWarning, stacklevel=2)
    if deterministic:  # PaddleRec's switch: deterministic cuDNN algorithms (CPU kernels are deterministic already)
        os.environ["FLAGS_cudnn_deterministic"] = "1"
    # Paddle warns about a missing ccache on every import (it matters only when compiling C++ extensions); it
    # would bury the tools' one-line warnings and errors on stderr.
    warnings.filterwarnings("ignore", message=r"No ccache found")


def environment_snapshot() -> dict:
    return {name: os.environ.get(name) for name in ENVIRONMENT_VARIABLES}


def seed_everything(seed: int):
    import numpy as np
    import paddle

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    paddle.seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed an epoch starts from. Reseeding every epoch from (seed, epoch) makes epoch k draw the same random
    numbers whether or not the run was resumed before it; the odd multiplier keeps epoch seeds away from the
    seed the model was initialised with."""
    return (seed * 1_000_003 + (epoch + 1) * 7_919) % (2 ** 31 - 1)


def cpu_thread_count(config) -> int:
    """runner.num_threads, 0 meaning all cores shared evenly by the data-parallel ranks of this host (two ranks
    with two threads each on two cores run slower than with one each: 3.5 vs 2.5 s per MAML meta-iteration)."""
    requested = config.require("runner.num_threads", int, minimum=0)
    ranks = os.environ.get("PADDLE_LOCAL_SIZE", "1") if config.get("runner.use_fleet") else "1"
    return requested or max(1, (os.cpu_count() or 1) // max(1, int(ranks) if ranks.isdigit() else 1))


def select_device(config) -> str:
    """Set Paddle's device from runner.use_gpu and the CPU threads; return the device. A GPU this Paddle build or
    machine cannot provide is no error (configs travel between machines): one warning line, then the CPU."""
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
    core = getattr(getattr(paddle, "base", None), "core", None)
    if hasattr(core, "set_num_threads"):
        core.set_num_threads(cpu_thread_count(config))
    else:
        warn("this Paddle build cannot set the CPU thread count; runner.num_threads ignored")
    return device

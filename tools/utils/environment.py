"""The process a tool runs in: environment variables Paddle reads at start, the device, CPU threads, seeds.

Paddle reads its FLAGS_* environment variables once when it starts, so prepare_environment() must run before the
first `import paddle` anywhere in the process (the entry points load the
config, call this, and only then import paddle or a model plugin). Safe to
import before paddle.
"""
import os
import random
import sys
import warnings

from tools.utils.console import warn

# Variables that change how Paddle computes, recorded in the metrics file's start record so a run shows
# what its process actually ran with (set here, by the user, or by the model plugin).
ENVIRONMENT_VARIABLES = ("FLAGS_cudnn_deterministic", "MKL_DEBUG_CPU_TYPE", "GLIBC_TUNABLES")


def prepare_environment(deterministic: bool):
    """Set the environment Paddle should start with. Call before import paddle."""
    if "paddle" in sys.modules:
        warnings.warn("prepare_environment() called after paddle was imported; "
                      "FLAGS_cudnn_deterministic may be ignored", RuntimeWarning, stacklevel=2)
    if deterministic:
        # PaddleRec's determinism switch: deterministic cuDNN algorithms.
        # Harmless on CPU builds; CPU kernels are deterministic already.
        os.environ["FLAGS_cudnn_deterministic"] = "1"
    # Paddle warns about a missing ccache on every import (it matters only
    # when compiling C++ extensions); it would bury the tools' one-line
    # warnings and errors on stderr.
    warnings.filterwarnings("ignore", message=r"No ccache found")


def environment_snapshot() -> dict:
    return {name: os.environ.get(name) for name in ENVIRONMENT_VARIABLES}


def seed_everything(seed: int):
    """Seed Python's, numpy's and Paddle's global generators."""
    import numpy as np
    import paddle

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    paddle.seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed an epoch starts from.

    Reseeding every epoch from (seed, epoch) instead of letting the generator
    run on makes epoch k see the same random numbers (dropout, sampling)
    whether the run was resumed before it or not. The odd multiplier keeps
    epoch seeds away from the seed used to initialise the model.
    """
    return (seed * 1_000_003 + (epoch + 1) * 7_919) % (2 ** 31 - 1)


def select_device(config) -> str:
    """Set Paddle's device from runner.use_gpu; return the device string.

    Asking for a GPU that this Paddle build or machine cannot provide is not
    an error (configs are shared between machines): one warning line, then CPU.
    """
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
    set_cpu_threads(config)
    return device


def local_rank_count() -> int:
    """Processes a distributed launcher started on this host (PADDLE_LOCAL_SIZE), else 1."""
    try:
        return max(1, int(os.environ.get("PADDLE_LOCAL_SIZE", "1")))
    except ValueError:
        return 1


def cpu_thread_count(config) -> int:
    """runner.num_threads, with 0 meaning all cores, shared evenly by the data-parallel ranks of this host.

    Two ranks with two threads each on two cores run slower than two ranks with
    one thread each (measured with MAML here: 3.5 vs 2.5 s per meta-iteration).
    """
    requested = config.require("runner.num_threads", int)
    if requested < 0:
        raise config.error("runner.num_threads", f"must be 0 (all cores) or more, got {requested}")
    if requested:
        return requested
    ranks = local_rank_count() if config.get("runner.use_fleet") else 1
    return max(1, (os.cpu_count() or 1) // ranks)


def set_cpu_threads(config) -> int:
    """Apply runner.num_threads (0 = all cores); return the count used."""
    import paddle

    threads = cpu_thread_count(config)
    core = getattr(getattr(paddle, "base", None), "core", None)
    if core is not None and hasattr(core, "set_num_threads"):
        core.set_num_threads(threads)
    else:
        warn("this Paddle build cannot set the CPU thread count; runner.num_threads ignored")
    return threads

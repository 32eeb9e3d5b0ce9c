"""Process environment and seeding. Safe to import before paddle.

Paddle reads its FLAGS_* environment variables, and MKL its tuning variables,
once when the library starts, so prepare_environment() must run before the
first `import paddle` anywhere in the process (the entry points load the
config, call this, and only then import paddle or a model plugin).
"""
import os
import random
import sys
import warnings

# Values this module sets; recorded in the metrics file's start record so a
# run shows what its process actually ran with.
ENVIRONMENT_VARIABLES = ("MKL_DEBUG_CPU_TYPE", "FLAGS_cudnn_deterministic")


def prepare_environment(deterministic: bool):
    """Set the environment Paddle should start with. Call before import paddle."""
    if "paddle" in sys.modules:
        warnings.warn("prepare_environment() called after paddle was imported; "
                      "FLAGS_cudnn_deterministic may be ignored", RuntimeWarning, stacklevel=2)
    # Paddle's bundled (older) MKL picks a slow generic code path on AMD CPUs;
    # type 5 selects the AVX2 path. Measured on this AMD EPYC machine: matmul
    # 68 -> 223 GFLOP/s, conv2d about 2.5x faster. Intel CPUs ignore it.
    # setdefault: a user who set it deliberately keeps their value.
    os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
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

"""Keep large freed buffers in the process instead of handing them back to the kernel (glibc only).

By default glibc serves every allocation above 32 MiB with a fresh mmap and unmaps it on free, so each
large tensor Paddle allocates is page-faulted in again, every time. On a MAML meta-batch (tasks stacked on
channels: a 480 MB first-layer activation) that made same-shape elementwise kernels 4-10x slower than their
arithmetic here (ReLU on 120M floats: 294 ms -> 25 ms; see doc/performance.md). glibc reads its tunables
only at process start, so the tools re-execute themselves once with them set.
"""
import os
import sys

TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736"
_MARK = "glibc.malloc.mmap_threshold"


def reexec_with_allocator_tunables():
    """Re-execute this process with the tunables set, once; a no-op off Linux, when already set, or when
    MAML_NO_REEXEC=1 (for debuggers and profilers that must keep the original process)."""
    if not sys.platform.startswith("linux") or os.environ.get("MAML_NO_REEXEC") == "1":
        return
    current = os.environ.get("GLIBC_TUNABLES", "")
    if _MARK in current:
        return
    env = dict(os.environ, GLIBC_TUNABLES=f"{current}:{TUNABLES}" if current else TUNABLES)
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.orig_argv (3.10+) keeps interpreter flags such as -u; older Pythons lose only those.
    argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    os.execve(sys.executable, argv, env)

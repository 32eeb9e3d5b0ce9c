"""Choosing the device and the CPU thread count."""
import os


def select_device(config) -> str:
    """Set Paddle's device from runner.use_gpu; return the device string.

    Asking for a GPU that this Paddle build or machine cannot provide is not
    an error (configs are shared between machines): one warning line, then CPU.
    """
    import paddle

    from tools.utils.console import warn

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


def cpu_thread_count(config) -> int:
    """runner.num_threads, with 0 meaning all cores."""
    requested = config.require("runner.num_threads", int)
    if requested < 0:
        raise config.error("runner.num_threads", f"must be 0 (all cores) or more, got {requested}")
    return requested or os.cpu_count() or 1


def set_cpu_threads(config) -> int:
    """Apply runner.num_threads (0 = all cores); return the count used."""
    import paddle

    from tools.utils.console import warn

    threads = cpu_thread_count(config)
    core = getattr(getattr(paddle, "base", None), "core", None)
    if core is not None and hasattr(core, "set_num_threads"):
        core.set_num_threads(threads)
    else:
        warn("this Paddle build cannot set the CPU thread count; runner.num_threads ignored")
    return threads

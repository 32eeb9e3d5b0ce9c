"""The CPU engine under the MAML network: layers with exact second derivatives at native-kernel speed.

This is its whole surface. The network (net.py) uses the differentiable ops; the plugin (dygraph_model.py)
prepares the process once and, for tools/benchmark.py, records and replays a meta-iteration's convolutions.
The modules behind it: double_grad_ops (the PyLayers), native_kernels (Paddle's kernels, one wrapper each),
onednn_conv and onednn_layers (oneDNN on channel-blocked tensors), cpu_schedule (two threads per call, the
process settings), kernel_replay (the benchmark's record and replay).
"""
from .cpu_schedule import BadVariable, conv_threads, prepare_cpu_process
from .double_grad_ops import (activation_block, batch_norm, batch_norm_by_support, conv2d, cross_entropy, max_pool2d,
                              max_pool2d_relu, to_plain)
from .kernel_replay import recording_convolutions, replay_seconds

__all__ = ["conv2d", "batch_norm", "batch_norm_by_support", "max_pool2d", "max_pool2d_relu", "cross_entropy", "activation_block", "to_plain",
           "BadVariable", "conv_threads", "prepare_cpu_process", "recording_convolutions", "replay_seconds"]

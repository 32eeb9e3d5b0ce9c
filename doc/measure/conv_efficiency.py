"""How fast the blocked oneDNN convolutions run at the sizes a MAML meta-iteration calls them with, and how many
multiply-adds each order of MAML needs (doc/performance.md, "The last two targets against the workload's
arithmetic"). Run from the repository root, nothing else running:

    python doc/measure/conv_efficiency.py

Prints, for blocks 2-4 of config_paddlerec's network (64 channels, 4 tasks per call as maml.py chunks them), the
speed of one call of the forward and of both gradients on one thread, with 5 images per task (a support set) and
75 (a query set); then the multiply-adds per meta-iteration of first and of second order.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "models" / "multitask" / "maml"))

import paddle  # noqa: E402

from maml_kernels import native_kernels, onednn_conv, onednn_layers  # noqa: E402

TASKS, CHANNELS, IMAGE, BLOCKS = 4, 64, 28, 4
SUPPORT, QUERY, TASKS_PER_BATCH, STEPS = 5, 75, 32, 5  # images per task (5-way 1-shot, 15 queries), meta-batch


def best_seconds(fn, repeats):
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        times.append((time.perf_counter() - start) / repeats)
    return min(times)


def call_speeds():
    conv = native_kernels.ConvSettings(1, 1, TASKS)
    block = onednn_conv.activation_block([SUPPORT, TASKS * CHANNELS, 14, 14], [TASKS * CHANNELS, CHANNELS, 3, 3], conv)
    if not block:  # not an error: the model then keeps plain NCHW activations on this CPU
        print("oneDNN's convolution asks for no blocked layout on this CPU: no blocked calls to time")
        return
    conv = native_kernels.ConvSettings(1, 1, TASKS, block)
    print(f"one thread, {TASKS} tasks x {CHANNELS} channels per call, activations blocked by {block}")
    for images in (SUPPORT, QUERY):
        macs_total = seconds_total = 0.0
        for size in (14, 7, 3):  # blocks 2-4 after 28x28 -> 14 -> 7 -> 3 pooling
            x = onednn_layers.blocked(paddle.randn([images, TASKS * CHANNELS, size, size]), block)
            w = paddle.randn([TASKS * CHANNELS, CHANNELS, 3, 3])
            y = onednn_conv.conv2d(x, w, conv)
            dy = paddle.randn(y.shape)
            macs = images * size * size * TASKS * CHANNELS * CHANNELS * 9
            repeats = max(3, int(2e9 / macs))
            forward = best_seconds(lambda: onednn_conv.conv2d(x, w, conv, out=y), repeats)
            gradients = best_seconds(lambda: onednn_conv.conv2d_grad(x, w, dy, conv), repeats)
            print(f"  {images:3d} images per task, {size:2d}x{size:<2d}: forward {macs / forward / 1e9:6.1f} GMAC/s "
                  f"({forward * 1e3:7.3f} ms), both gradients {2 * macs / gradients / 1e9:6.1f} GMAC/s "
                  f"({gradients * 1e3:7.3f} ms)")
            macs_total += 3 * macs
            seconds_total += forward + gradients
        print(f"  {images:3d} images per task, blocks 2-4, forward and both gradients: "
              f"{macs_total / seconds_total / 1e9:.1f} GMAC/s")


def multiply_adds():
    layers, channels_in, size = [], 1, IMAGE
    for _ in range(BLOCKS):
        layers.append(size * size * channels_in * CHANNELS * 9)
        size, channels_in = size // 2, CHANNELS
    forward = weight_grad = sum(layers)
    input_grad = forward - layers[0]  # the images take no gradient
    step = forward + input_grad + weight_grad
    # Back through one step's backward: the derivatives of the weight gradient (forward-like and input-gradient-
    # like), of the input gradient (forward-like and weight-gradient-like, not in the first layer) and of the
    # forward (input and weight gradient).
    through_step = 2 * forward + 2 * input_grad + 2 * weight_grad - 2 * layers[0]
    support, query = SUPPORT * TASKS_PER_BATCH * STEPS, QUERY * TASKS_PER_BATCH
    first = (support + query) * step
    second = first + support * through_step
    print(f"multiply-adds per image: forward {forward / 1e6:.2f} M, input gradients {input_grad / 1e6:.2f} M, "
          f"weight gradients {weight_grad / 1e6:.2f} M, back through a step {through_step / 1e6:.2f} M")
    print(f"per meta-iteration: first order {first / 1e9:.1f} G, second order {second / 1e9:.1f} G, "
          f"ratio {second / first:.3f}")


if __name__ == "__main__":
    paddle.set_device("cpu")
    multiply_adds()
    call_speeds()

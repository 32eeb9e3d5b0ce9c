"""The double-differentiable ops stay in bounds whatever the values: NaN, +-inf and ties go through the
forward, the backward and the double backward of every op without a crash, a hang or a write outside the
tensors. (Once an all-NaN max-pool window got index -1 and the backward wrote before the buffer,
corrupting the heap of a training run whose inner learning rate was 1e6.)

The ops run in a child process with a timeout: a heap corruption may crash it or hang it, and must fail
this test rather than the test session.
"""
import json
import os
import subprocess
import sys

from tests.conftest import REPO_ROOT

_CHILD = r"""
import json, sys
import numpy as np
import paddle
sys.path.insert(0, sys.argv[1])
from tests import maml_modules

_, _, _, ops = maml_modules.load()
paddle.set_default_dtype("float32")
rng = np.random.default_rng(0)

def filled(shape, kind):
    if kind == "nan":
        return np.full(shape, np.nan)
    if kind == "inf":
        return np.full(shape, np.inf)
    if kind == "-inf":
        return np.full(shape, -np.inf)
    if kind == "ties":
        return np.zeros(shape)
    values = rng.standard_normal(shape)  # "mixed": a few of each special value among normal ones
    flat = values.reshape(-1)
    flat[rng.choice(flat.size, 3 * max(1, flat.size // 10), replace=False)] = np.repeat([np.nan, np.inf, -np.inf], max(1, flat.size // 10))
    return values

labels = paddle.to_tensor(rng.integers(0, 5, (3, 4)))
OPS = {
    "conv2d": (lambda x, w: ops.conv2d(x, w, 1, 1, 1), [(8, 4, 6, 6), (5, 4, 3, 3)]),
    "batch_norm": (lambda x, g, b: ops.batch_norm(x, g, b), [(8, 4, 6, 6), (4,), (4,)]),
    "max_pool2d": (lambda x: ops.max_pool2d(x), [(8, 4, 6, 6)]),
    "max_pool2d small batch": (lambda x: ops.max_pool2d(x), [(2, 3, 5, 5)]),
    "cross_entropy": (lambda z: ops.cross_entropy(z, labels), [(3, 4, 5)]),
}
report = {}
for name, (f, shapes) in OPS.items():
    for kind in ("nan", "inf", "-inf", "ties", "mixed"):
        ts = [paddle.to_tensor(filled(s, kind).astype("float32"), stop_gradient=False) for s in shapes]
        out = f(*ts)
        grads = paddle.grad((out * out).sum(), ts, create_graph=True)
        second = paddle.grad(sum((g * g).sum() for g in grads), ts, allow_unused=True)
        report[f"{name} {kind}"] = {
            "out": list(out.shape), "grads": [list(g.shape) for g in grads],
            "second": [None if g is None else list(g.shape) for g in second], "inputs": [list(s) for s in shapes]}

# Where a window's backward lands: plane 1 is all -inf (no value beats the kernel's start of -FLT_MAX);
# plane 0 is finite with its maximum at element 0. Routing must stay inside each plane.
x = paddle.to_tensor(np.stack([np.array([[4.0, 1.0], [2.0, 3.0]]), np.full((2, 2), -np.inf)])[None].astype("float32"))
dout = paddle.to_tensor(np.array([1.0, 1.0], dtype="float32").reshape(1, 2, 1, 1), stop_gradient=False)
x.stop_gradient = False
(dx,) = paddle.grad((ops.max_pool2d(x) * dout).sum(), [x], create_graph=True)
# The double backward gathers an upstream gradient at the same positions: d/d(dout) of sum(dx * ddx).
ddx = paddle.to_tensor(np.arange(1, 9, dtype="float32").reshape(1, 2, 2, 2))
(d_dout,) = paddle.grad((dx * ddx).sum(), [dout])
report["routing"] = {"dx": dx.numpy().tolist(), "d_dout": d_dout.numpy().reshape(-1).tolist()}
print("REPORT " + json.dumps(report))
"""


def test_every_op_stays_in_bounds_with_nan_inf_and_ties():
    process = subprocess.run([sys.executable, "-c", _CHILD, REPO_ROOT], capture_output=True, text=True,
                             timeout=120, env=dict(os.environ, MAML_CONV_THREADS="2"), cwd=REPO_ROOT)
    assert process.returncode == 0, f"exit {process.returncode}\n{process.stderr[-3000:]}"
    lines = [line for line in process.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, process.stdout[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])
    assert len(report) == 5 * 5 + 1
    for case, shapes in report.items():
        if case == "routing":
            continue
        assert shapes["grads"] == shapes["inputs"], case
        assert all(s is None or s == i for s, i in zip(shapes["second"], shapes["inputs"])), case
    # The finite plane's gradient is exactly its own argmax; the -inf plane's window must not leak into it.
    dx = report["routing"]["dx"]
    assert dx[0][0] == [[1.0, 0.0], [0.0, 0.0]], dx
    # ... and the double backward reads the -inf plane's own element, not one before its row.
    d_dout = report["routing"]["d_dout"]
    assert d_dout[0] == 1.0 and d_dout[1] in (5.0, 6.0, 7.0, 8.0), d_dout

"""The MAML model folder's modules, imported the way the tools import a plugin, and float64 helpers."""
import contextlib
import os

import numpy as np

from tests.conftest import REPO_ROOT
from tools.utils.plugin import import_file

MODEL_DIR = os.path.join(REPO_ROOT, "models", "multitask", "maml")


def load():
    """(dygraph_model, net, maml, maml_kernels) modules of models/multitask/maml."""
    plugin = import_file(os.path.join(MODEL_DIR, "dygraph_model.py"))
    # The plugin's own engine: sys.modules may hold another copy by now, imported after a test loaded another
    # model folder (the plugin loader forgets the modules of the folder loaded before).
    return plugin, plugin.net, plugin.maml, plugin.maml_kernels


def settings():
    """The model's settings module (maml_settings.py: the table of keys and the settings derived from them)."""
    return load()[0].settings


@contextlib.contextmanager
def float64():
    """Gradient checks need float64 parameters and tensors; restore the default afterwards."""
    import paddle

    previous = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")
    try:
        yield
    finally:
        paddle.set_default_dtype(previous)


def central_difference(f, point, direction, eps=1e-6):
    """d/dt f(point + t direction) at t=0, for f of a list of arrays."""
    plus = f([p + eps * d for p, d in zip(point, direction)])
    minus = f([p - eps * d for p, d in zip(point, direction)])
    return (plus - minus) / (2 * eps)


def directional(grads, direction):
    return sum(float((np.asarray(g) * d).sum()) for g, d in zip(grads, direction))


def relative_error(a, b):
    return abs(a - b) / max(abs(b), 1e-12)

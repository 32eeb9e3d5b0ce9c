"""Faults in numbers and in data, through the real tools (issue 11): a NaN or infinite loss, gradient or
parameter stops training with one line and writes no checkpoint of it; a hostile data archive writes
nothing; a symlink loop or an unreadable folder in a data tree is one line naming the path.

Every subprocess has a timeout (tests/tool_helpers.run_tool, or its own): the defects these tests pin
down used to hang."""
import os
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest

from tests.tool_helpers import REPO_ROOT, TOY_CONFIG, TOY_DIR, assert_ok, assert_user_error, run_tool
from tools.utils.errors import UserError
from tools.utils.finite import NonFiniteError, NumericGuard, likely_causes
from tools.utils.plugin import non_finite_keys

MAML_CONFIG = os.path.join(REPO_ROOT, "models", "multitask", "maml", "config.yaml")
MAML_SMALL = ["runner.tasks_per_epoch=8", "runner.train_batch_size=8", "runner.infer_tasks=10",
              "runner.infer_batch_size=10"]
TOY_KEYS = '\nNON_FINITE_KEYS = {"hyper_parameters.optimizer.learning_rate": "the learning rate"}\n'


def epoch_folders(out):
    return sorted(name for name in os.listdir(out) if name.isdigit()) if os.path.isdir(out) else []


def train(config, out, *overrides, timeout=120):
    command = [sys.executable, "-u", os.path.join(REPO_ROOT, "tools", "trainer.py"), "-m", str(config), "-o",
               f"runner.model_save_path={out}", *overrides]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def toy_with_keys(tmp_path):
    """A copy of the toy plugin that declares NON_FINITE_KEYS, like the MAML plugin does."""
    plugin = tmp_path / "toy"
    shutil.copytree(TOY_DIR, plugin, ignore=shutil.ignore_patterns("output_*", "__pycache__"))
    with open(plugin / "dygraph_model.py", "a", encoding="utf-8") as handle:
        handle.write(TOY_KEYS)
    return plugin / "config.yaml"


# ------------------------------------------------------------------------------------ numerical faults
def test_maml_inner_rate_1e6_stops_at_the_first_nan_without_hang_or_checkpoint(tmp_path):
    """The issue's command: it used to save a NaN epoch 0, then corrupt the heap and hang."""
    out = tmp_path / "out"
    process = train(MAML_CONFIG, out, *MAML_SMALL, "runner.epochs=2",
                    "hyper_parameters.base_optimizer.learning_rate=1e6", timeout=240)
    line = assert_user_error(process, "epoch 0, batch 0", "the loss is nan",
                             "hyper_parameters.base_optimizer.learning_rate", "now 1000000.0",
                             "hyper_parameters.meta_optimizer.learning_rate")
    assert "nothing of epoch 0 saved" in line
    assert epoch_folders(out) == []


def test_nan_loss_stops_before_the_update_and_saves_nothing(tmp_path):
    out = tmp_path / "out"
    process = run_tool("trainer.py", "-m", TOY_CONFIG, "-o", f"runner.model_save_path={out}",
                       "hyper_parameters.optimizer.class=SGD", "hyper_parameters.optimizer.learning_rate=1e38")
    assert_user_error(process, "epoch 0, batch 1: the loss is nan", "check the learning rate(s) and the data")
    assert epoch_folders(out) == []


def test_nan_after_resume_keeps_the_good_checkpoints_and_names_the_plugins_keys(tmp_path):
    config, out = toy_with_keys(tmp_path), tmp_path / "out"
    assert_ok(train(config, out, "runner.epochs=1"))
    process = train(config, out, "runner.epochs=3", "runner.model_init_path=auto",
                    "hyper_parameters.optimizer.learning_rate=1e38")
    assert_user_error(process, "epoch 1, batch 1: the loss is nan", "nothing of epoch 1 saved",
                      "hyper_parameters.optimizer.learning_rate (the learning rate, now 1e+38)")
    assert epoch_folders(out) == ["0"]
    state = paddle.load(str(out / "0" / "rec.pdparams"))
    assert all(np.isfinite(value.numpy()).all() for value in state.values())


def test_parameters_overflowing_in_the_last_update_are_never_saved(tmp_path):
    """One batch per epoch: the loss and gradients are finite, the update makes the weights non-finite."""
    out = tmp_path / "out"
    process = run_tool("trainer.py", "-m", TOY_CONFIG, "-o", f"runner.model_save_path={out}",
                       "runner.tasks_per_epoch=32", "hyper_parameters.optimizer.class=SGD",
                       "hyper_parameters.optimizer.learning_rate=1e39")
    assert_user_error(process, "epoch 0: parameter", "is not finite", "its checkpoint is not written")
    assert epoch_folders(out) == []


class _Tiny(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.first = paddle.nn.Linear(3, 3)
        self.second = paddle.nn.Linear(3, 1)

    def forward(self, x):
        return self.second(self.first(x))


def _tiny_with_gradients(scale):
    paddle.seed(0)
    model = _Tiny()
    (model(paddle.ones([2, 3])).sum() * scale).backward()
    return model


def test_guard_names_the_parameter_whose_gradient_is_not_finite():
    guard = NumericGuard("check x", warn=lambda message: None)
    model = _tiny_with_gradients(1.0)
    guard.check_batch(1.0, model, 0, 0)  # finite: passes
    model.first.weight.grad.set_value(paddle.full([3, 3], float("inf")))
    with pytest.raises(NonFiniteError, match=r"epoch 2, batch 5: the gradient of first.weight is not finite.*check x"):
        guard.check_batch(0.5, model, 2, 5)


def test_guard_has_no_false_alarm_on_huge_finite_values():
    """The probe multiplies by zero before summing: a norm or a sum of 3e38s would overflow to inf."""
    guard = NumericGuard("check x", warn=lambda message: None)
    model = _tiny_with_gradients(1e37)
    for parameter in model.parameters():
        parameter.set_value(paddle.full(parameter.shape, 3e38))
    guard.check_batch(1e30, model, 0, 0)
    guard.check_parameters(model, 0)
    model.second.bias.set_value(paddle.to_tensor([float("nan")]))
    with pytest.raises(NonFiniteError, match="epoch 0: parameter second.bias is not finite"):
        guard.check_parameters(model, 0)


def test_guard_warns_once_when_the_loss_explodes_but_stays_finite():
    warnings = []
    guard = NumericGuard("check x", warn=warnings.append)
    model = _tiny_with_gradients(1.0)
    for batch, loss in enumerate([1.5, 3.0, 2e5, 7e12, 1e13]):
        guard.check_batch(loss, model, 0, batch)
    assert len(warnings) == 1 and "batch 2: the loss is 2e+05, up from 1.5" in warnings[0], warnings


def test_plugin_non_finite_keys_are_checked_and_formatted():
    class Module:
        __file__ = "plugin.py"

    assert non_finite_keys(Module) == {}
    Module.NON_FINITE_KEYS = {"a.b": "the rate"}
    assert likely_causes({"a.b": 0.5}, non_finite_keys(Module)) == "check a.b (the rate, now 0.5)"
    Module.NON_FINITE_KEYS = ["a.b"]
    with pytest.raises(UserError, match="plugin.py: NON_FINITE_KEYS must be a dict"):
        non_finite_keys(Module)

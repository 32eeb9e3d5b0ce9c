"""Every runner.* value has a range, not only a type (RUNNER_DEFAULTS' bounds), and a YAML key no table declares
gets the warning an unknown -o key gets. In-process through the config loader, and through the real trainer
for the values that used to end in a native abort or a traceback."""
import os
import re

import pytest

from tool_helpers import REPO_ROOT, TOY_CONFIG, TOY_DIR, assert_user_error, run_tool
from tools.utils import config as config_module
from tools.utils.config import RUNNER_DEFAULTS, load_config
from tools.utils.console import UserError

pytestmark = pytest.mark.filterwarnings("ignore:No ccache found")
MAML_CONFIG = os.path.join(REPO_ROOT, "models", "multitask", "maml", "config.yaml")


@pytest.mark.parametrize("key, value", [
    ("runner.num_threads", "100000"), ("runner.num_threads", "-1"),
    ("runner.seed", "-1"), ("runner.seed", str(10 ** 23)), ("runner.seed", str(2 ** 32)),
    ("runner.epochs", str(2 ** 31)), ("runner.train_batch_size", "0"), ("runner.train_batch_size", str(10 ** 9)),
    ("runner.print_interval", "0"), ("runner.sync_timeout", "0"), ("runner.sync_timeout", str(10 ** 12)),
    ("runner.infer_start_epoch", "-1"), ("runner.infer_ensemble", "0"), ("runner.valid_interval", "0"),
    ("runner.tasks_per_epoch", "0"), ("runner.valid_mode", "maximum")])
def test_a_value_out_of_range_is_one_error_naming_the_key(key, value):
    with pytest.raises(UserError) as caught:
        load_config(TOY_CONFIG, [f"{key}={value}"])
    assert key in str(caught.value) and value in str(caught.value), caught.value


def test_a_value_out_of_range_in_the_yaml_is_named_too(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(open(TOY_CONFIG).read().replace("seed: 2026", "seed: -1"))
    with pytest.raises(UserError, match=r"config.yaml: runner.seed: must be from 0 to 2\^32-1, got -1"):
        load_config(str(path))


def test_every_number_key_has_a_range():
    unbounded = [key for key, spec in RUNNER_DEFAULTS.items() if spec.type is int and spec.bounds is None]
    assert not unbounded


def test_the_thread_bound_follows_the_machine(monkeypatch):
    monkeypatch.setattr(config_module.os, "cpu_count", lambda: 3)
    load_config(TOY_CONFIG, ["runner.num_threads=12"])
    with pytest.raises(UserError, match=r"runner.num_threads: must be from 0 to 12 \(4 x the CPUs\), got 13"):
        load_config(TOY_CONFIG, ["runner.num_threads=13"])


@pytest.mark.parametrize("override, fragment", [
    ("runner.num_threads=100000", "runner.num_threads: must be from 0 to"),  # was an OMP abort and a C++ dump
    ("runner.seed=-1", "runner.seed: must be from 0 to 2^32-1, got -1")])  # was a manual_seed() TypeError
def test_the_trainer_refuses_them_in_one_line(tmp_path, override, fragment):
    process = run_tool("trainer.py", "-m", TOY_CONFIG, "-o", f"runner.model_save_path={tmp_path / 'out'}", override)
    assert_user_error(process, fragment)
    assert not (tmp_path / "out").exists()


def test_a_typo_in_the_yaml_gets_the_warning_an_unknown_override_gets(tmp_path):
    """A YAML typo was read as nothing, without a word; the same typo in -o was already an error."""
    import shutil

    folder = tmp_path / "toy"
    shutil.copytree(TOY_DIR, folder, ignore=shutil.ignore_patterns("output*", "__pycache__"))
    text = (folder / "config.yaml").read_text().replace("  hidden_size: 16\n", "  hidden_size: 16\n  hiddensize: 8\n")
    (folder / "config.yaml").write_text(text.replace("  epochs: 2\n", "  epochs: 1\n  epoch: 3\n"))
    process = run_tool("trainer.py", "-m", folder / "config.yaml", "-o", f"runner.model_save_path={tmp_path / 'out'}")
    assert process.returncode == 0, process.stderr
    warnings = [line for line in process.stderr.splitlines() if "unknown key" in line]
    assert len(warnings) == 2, process.stderr
    assert "hyper_parameters.hiddensize: unknown key (did you mean hyper_parameters.hidden_size?)" \
        in warnings[0]
    assert "runner.epoch: unknown key (did you mean runner.epochs" in warnings[1]


def test_the_shipped_configs_have_no_unknown_keys():
    """Every key of the shipped MAML configs is declared, so a real typo is the only thing warned about."""
    import glob

    from tools.utils.plugin import import_plugin_module, plugin_declaration

    for path in sorted(glob.glob(os.path.join(REPO_ROOT, "models", "multitask", "maml", "config*.yaml"))):
        plugin = import_plugin_module(load_config(path))
        known = set(RUNNER_DEFAULTS) | set(plugin_declaration(plugin, "CONFIG_DEFAULTS")) | set(
            plugin_declaration(plugin, "CONFIG_KEYS"))
        yaml_keys = set(config_module.flatten(config_module.read_yaml_mapping(path)))
        assert yaml_keys <= known, (path, sorted(yaml_keys - known))


# ----- environment variables: checked before Paddle is imported, each on its own ---------------------------

@pytest.mark.parametrize("tool", ["trainer.py", "infer.py"])
@pytest.mark.parametrize("name, value", [("PADDLE_TRAINER_ID", "abc"), ("PADDLE_TRAINERS_NUM", "abc"),
                                         ("PADDLE_TRAINER_ID", "")])
def test_a_launcher_variable_alone_is_checked(tmp_path, tool, name, value):
    """With the other unset it used to reach `import paddle` and end in its traceback."""
    env = {"PADDLE_TRAINER_ID": None, "PADDLE_TRAINERS_NUM": None, name: value}
    process = run_tool(tool, "-m", TOY_CONFIG, "-o", f"runner.model_save_path={tmp_path / 'out'}",
                       env={key: item for key, item in env.items() if item is not None},
                       unset=[key for key, item in env.items() if item is None])
    assert_user_error(process, f"environment variable {name}: expected an integer, got {value!r}")


@pytest.mark.parametrize("name, value, fragment", [
    ("MAML_CONV_THREADS", "abc", "expected an integer, got 'abc'"),  # was a ValueError traceback at import
    ("MAML_CONV_THREADS", "0", "must be from 1 to"), ("MAML_ONEDNN_BLOCKED", "yes", "expected one of 0, 1"),
    ("PADDLE_LOCAL_SIZE", "-2", "must be from 1 to"), ("PADDLE_TRAINERS_NUM", str(2 ** 40), "must be from 1 to")])
def test_every_variable_of_the_table_has_a_range(name, value, fragment):
    from tools.utils.environment import check_environment

    with pytest.raises(UserError, match=f"environment variable {name}: {re.escape(fragment)}"):
        check_environment({name: value})


def test_the_maml_trainer_refuses_a_bad_variable_before_importing_paddle(tmp_path):
    """A stand-in `paddle` package first on the path ends any process that imports it: the check comes first."""
    (tmp_path / "paddle").mkdir()
    (tmp_path / "paddle" / "__init__.py").write_text("raise SystemExit('paddle was imported')\n")
    process = run_tool("trainer.py", "-m", MAML_CONFIG, "-o", f"runner.model_save_path={tmp_path / 'out'}",
                       env={"MAML_CONV_THREADS": "abc", "PYTHONPATH": str(tmp_path)})
    assert_user_error(process, "environment variable MAML_CONV_THREADS: expected an integer, got 'abc'")


def test_valid_values_pass():
    from tools.utils.environment import check_environment

    assert check_environment({"PADDLE_TRAINER_ID": "1", "PADDLE_TRAINERS_NUM": "2", "MAML_ONEDNN": "0",
                              "XDG_CACHE_HOME": ""}) == {"PADDLE_TRAINER_ID": 1, "PADDLE_TRAINERS_NUM": 2,
                                                         "MAML_ONEDNN": "0"}
    with pytest.raises(UserError, match="PADDLE_TRAINER_ID: must be below PADDLE_TRAINERS_NUM=2, got 2"):
        check_environment({"PADDLE_TRAINER_ID": "2", "PADDLE_TRAINERS_NUM": "2"})

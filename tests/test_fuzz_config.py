"""Hostile values for every key of the runner table and of the model plugins' tables (Hypothesis).

Each value (zero, negative, huge, non-finite, wrong type, empty, a list, null) must end in one `error:` line naming
the key, or in a normal short run. Most examples go through the config loader in-process (fast); a few through
the real trainer, each under a timeout and a memory limit. Derandomized, and without shrinking for the
subprocess runs, so a CI run is reproducible and bounded."""
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tool_helpers import REPO_ROOT, TOOLS_DIR, TOY_CONFIG, TOY_DIR
from tools.utils.config import RUNNER_DEFAULTS, check_type, load_config
from tools.utils.console import UserError
from tools.utils.plugin import import_plugin_module, plugin_declaration

pytestmark = pytest.mark.filterwarnings("ignore:No ccache found")
MAML_CONFIG = os.path.join(REPO_ROOT, "models", "multitask", "maml", "config.yaml")
# -o text, and the same value as a YAML file holds it
HOSTILE = [("0", 0), ("-1", -1), (str(2 ** 31), 2 ** 31), (str(10 ** 30), 10 ** 30), ("1e300", 1e300),
           (".nan", math.nan), (".inf", math.inf), ("-.inf", -math.inf), ("", ""), ("abc", "abc"), ("[1]", [1]),
           ("[]", []), ("true", True), ("null", None), ("-0.5", -0.5)]


def plugin_keys(config_path):
    """The plugin's table: the keys of its CONFIG_DEFAULTS and its CONFIG_KEYS (those without a default)."""
    plugin = import_plugin_module(load_config(config_path))
    return sorted(set(plugin_declaration(plugin, "CONFIG_DEFAULTS")) | set(plugin_declaration(plugin, "CONFIG_KEYS")))


TABLES = {TOY_CONFIG: sorted(RUNNER_DEFAULTS) + plugin_keys(TOY_CONFIG), MAML_CONFIG: plugin_keys(MAML_CONFIG)}
CASES = st.sampled_from([(config, key) for config, keys in TABLES.items() for key in keys])


def nest(key, value):
    """{'a': {'b': value}} for 'a.b'."""
    head, _, rest = key.partition(".")
    return {head: nest(rest, value) if rest else value}


def merged(base, extra):
    for name, value in extra.items():
        base[name] = merged(base.get(name) or {}, value) if isinstance(value, dict) else value
    return base


def assert_loaded_or_refused(load, key):
    """The loader either refuses in a UserError naming the key or gives a value of the key's type in range."""
    try:
        config = load()
    except UserError as error:
        assert key in str(error), str(error)
        return
    spec = RUNNER_DEFAULTS.get(key)
    if spec is not None and config[key] is not None:
        check_type(config[key], spec.type)
        assert spec.bounds is None or spec.bounds.problem(config[key]) is None, (key, config[key])


@settings(database=None, deadline=None, max_examples=400, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=CASES, value=st.sampled_from(HOSTILE), through_yaml=st.booleans())
def test_the_loader_refuses_or_keeps_every_hostile_value(case, value, through_yaml):
    config_path, key = case
    text, data = value
    defaults = plugin_declaration(import_plugin_module(load_config(config_path)), "CONFIG_DEFAULTS")
    if not through_yaml:
        assert_loaded_or_refused(lambda: load_config(config_path, [f"{key}={text}"], defaults), key)
        return
    with tempfile.TemporaryDirectory() as folder:
        with open(config_path, encoding="utf-8") as handle:
            content = merged(yaml.safe_load(handle), nest(key, data))
        path = os.path.join(folder, "config.yaml")
        with open(path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(content, handle)
        assert_loaded_or_refused(lambda: load_config(path, (), defaults), key)


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a setting that asks for more is refused in time


def run_trainer(config, out, overrides):
    command = [sys.executable, "-u", os.path.join(TOOLS_DIR, "trainer.py"), "-m", config, "-o",
               f"runner.model_save_path={out}", *overrides]
    try:
        return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=90,
                              preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no end within 90 s: {' '.join(overrides)}")


def assert_error_naming_or_ok(process, key, overrides):
    lines = process.stderr.strip().splitlines()
    if process.returncode == 0:
        return
    assert process.returncode == 2 and lines and lines[-1].startswith("error: ") and key in lines[-1], \
        f"{' '.join(overrides)}: exit {process.returncode}\n{process.stderr[-3000:]}"
    assert "Traceback" not in process.stderr, process.stderr[-3000:]


SHORT = {TOY_CONFIG: ["runner.epochs=1", "runner.tasks_per_epoch=64", "runner.infer_tasks=50"],
         MAML_CONFIG: ["runner.epochs=1", "runner.tasks_per_epoch=2", "runner.train_batch_size=2",
                       "runner.infer_tasks=2", "runner.infer_batch_size=2", "hyper_parameters.update_step=1",
                       "hyper_parameters.update_step_test=1"]}


@settings(database=None, deadline=None, max_examples=6, derandomize=True, phases=[Phase.explicit, Phase.generate])
@given(key=st.sampled_from(sorted(RUNNER_DEFAULTS)), value=st.sampled_from(HOSTILE))
def test_the_trainer_ends_in_one_line_or_a_short_run_for_runner_keys(key, value):
    """On a copy of the toy model, so relative paths a hostile value makes land in a temporary folder."""
    with tempfile.TemporaryDirectory() as folder:
        toy = os.path.join(folder, "toy")
        shutil.copytree(TOY_DIR, toy, ignore=shutil.ignore_patterns("output*", "__pycache__"))
        overrides = [*SHORT[TOY_CONFIG], f"{key}={value[0]}"]
        process = run_trainer(os.path.join(toy, "config.yaml"), os.path.join(folder, "out"), overrides)
        assert_error_naming_or_ok(process, key, overrides)


@settings(database=None, deadline=None, max_examples=4, derandomize=True, phases=[Phase.explicit, Phase.generate])
@given(key=st.sampled_from(TABLES[MAML_CONFIG]), value=st.sampled_from(HOSTILE))
def test_the_trainer_ends_in_one_line_or_a_short_run_for_model_keys(key, value):
    with tempfile.TemporaryDirectory() as folder:
        overrides = [*[item for item in SHORT[MAML_CONFIG] if not item.startswith(f"{key}=")], f"{key}={value[0]}"]
        process = run_trainer(MAML_CONFIG, os.path.join(folder, "out"), overrides)
        assert_error_naming_or_ok(process, key, overrides)

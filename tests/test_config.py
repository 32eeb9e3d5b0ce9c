"""tools/utils/config.py: flattening, defaults, -o typing, errors, paths."""
import os
import textwrap

import pytest

import tool_helpers  # noqa: F401  (puts the repository root on sys.path)
from tools.utils.console import config_arg_parser
from tools.utils.config import RUNNER_DEFAULTS, load_config
from tools.utils.console import UserError

YAML = """\
runner:
  epochs: 2
  train_batch_size: 8
  train_data_dir: "data/train"
  model_init_path: ""
hyper_parameters:
  n_way: 5
  base_lr: 0.4
  rotations: false
  conv_kernal: [3, 3]
  note: "hello"
  empty_value:
  meta_optimizer:
    class: Adam
    learning_rate: 0.001
"""


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(YAML)
    return str(path)


def load_error(path, overrides=(), plugin_defaults=None):
    with pytest.raises(UserError) as caught:
        load_config(path, overrides, plugin_defaults)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_yaml_leaves_become_flat_dotted_keys(config_path):
    config = load_config(config_path)
    assert config["runner.epochs"] == 2
    assert config["hyper_parameters.meta_optimizer.learning_rate"] == 0.001
    assert config.get("hyper_parameters.n_way") == 5
    assert config["hyper_parameters.conv_kernal"] == [3, 3]  # lists are leaves
    assert config["hyper_parameters.empty_value"] is None
    assert "hyper_parameters" not in config and "hyper_parameters.meta_optimizer" not in config
    assert config["config_abs_dir"] == os.path.dirname(config_path)
    assert config.path == config_path


def test_runner_defaults_fill_missing_keys(config_path):
    config = load_config(config_path)
    assert config["runner.seed"] == 2026
    assert config["runner.print_interval"] == 10
    assert config["runner.use_gpu"] is False
    assert config["runner.deterministic"] is True
    assert config["runner.num_threads"] == 0
    for key in ("runner.use_fleet", "runner.use_auc", "runner.tasks_per_epoch", "runner.infer_tasks",
                "runner.metrics_path", "runner.infer_load_path", "runner.model_save_path"):
        assert key in config and key in RUNNER_DEFAULTS
    assert all(spec.doc and "\n" not in spec.doc for spec in RUNNER_DEFAULTS.values())


def test_plugin_defaults_sit_under_the_yaml(config_path):
    config = load_config(config_path, plugin_defaults={"hyper_parameters.n_way": 20,
                                                        "hyper_parameters.update_step": 5})
    assert config["hyper_parameters.n_way"] == 5
    assert config["hyper_parameters.update_step"] == 5


@pytest.mark.parametrize("override, key, expected", [
    ("runner.epochs=7", "runner.epochs", 7),
    ("runner.seed=0", "runner.seed", 0),
    ("hyper_parameters.base_lr=1", "hyper_parameters.base_lr", 1.0),
    ("hyper_parameters.base_lr=1e-3", "hyper_parameters.base_lr", 0.001),
    ("runner.use_gpu=true", "runner.use_gpu", True),
    ("runner.use_gpu=True", "runner.use_gpu", True),
    ("runner.use_gpu=1", "runner.use_gpu", True),
    ("runner.use_gpu=yes", "runner.use_gpu", True),
    ("runner.deterministic=False", "runner.deterministic", False),
    ("runner.deterministic=0", "runner.deterministic", False),
    ("runner.deterministic=no", "runner.deterministic", False),
    ("hyper_parameters.rotations=true", "hyper_parameters.rotations", True),
    ("hyper_parameters.conv_kernal=[5, 5]", "hyper_parameters.conv_kernal", [5, 5]),
    ("hyper_parameters.note=123", "hyper_parameters.note", "123"),
    ("hyper_parameters.note=a=b", "hyper_parameters.note", "a=b"),
    ("hyper_parameters.meta_optimizer.class=SGD", "hyper_parameters.meta_optimizer.class", "SGD"),
    ("hyper_parameters.empty_value=3", "hyper_parameters.empty_value", 3),
    ("hyper_parameters.empty_value=abc", "hyper_parameters.empty_value", "abc"),
    ("runner.tasks_per_epoch=500", "runner.tasks_per_epoch", 500),
    ("runner.model_save_path=/tmp/out", "runner.model_save_path", "/tmp/out"),
])
def test_overrides_are_typed_like_the_value_they_replace(config_path, override, key, expected):
    value = load_config(config_path, [override])[key]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("override, fragment", [
    ("runner.epochs=0.5", "expected int, got '0.5'"),
    ("runner.epochs=abc", "expected int"),
    ("hyper_parameters.base_lr=fast", "expected float"),
    ("runner.use_gpu=maybe", "expected bool"),
    ("hyper_parameters.conv_kernal=3", "expected a list"),
    ("runner.tasks_per_epoch=many", "expected int"),
])
def test_badly_typed_override_names_the_key(config_path, override, fragment):
    key = override.split("=")[0]
    message = load_error(config_path, [override])
    assert message.startswith(f"{config_path}: -o {key}: ")
    assert fragment in message


def test_unknown_override_key_suggests_the_close_one(config_path):
    message = load_error(config_path, ["runner.epoch=3"])
    assert message == f"{config_path}: -o runner.epoch: unknown key (did you mean runner.epochs?)"
    assert "did you mean" not in load_error(config_path, ["completely.different=1"])


def test_override_of_a_plugin_default_key(config_path):
    defaults = {"hyper_parameters.update_step": 5, "hyper_parameters.update_lr": 0.4}
    config = load_config(config_path, ["hyper_parameters.update_step=10", "hyper_parameters.update_lr=1"], defaults)
    assert config["hyper_parameters.update_step"] == 10
    assert config["hyper_parameters.update_lr"] == 1.0
    assert "unknown key" in load_error(config_path, ["hyper_parameters.update_step=10"])


def test_override_without_equals_sign(config_path):
    assert "expected key=value" in load_error(config_path, ["runner.epochs"])


def test_command_line_accepts_both_override_styles():
    args = config_arg_parser("test").parse_args(["-m", "c.yaml", "-o", "a=1", "b=2", "-o", "c=3"])
    assert args.config == "c.yaml"
    assert args.overrides == ["a=1", "b=2", "c=3"]


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    assert load_error(path) == f"{path}: config file not found"


def test_unreadable_file(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00 not utf-8")
    assert load_error(str(path)).startswith(f"{path}: cannot read config file")


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("runner:\n  epochs: 2\n  bad: [1, 2\nhyper_parameters:\n  a: 1\n")
    message = load_error(str(path))
    assert message.startswith(f"{path}: line ")
    assert "YAML syntax error" in message


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    assert "top level must be a mapping" in load_error(str(path))


def test_wrongly_typed_runner_value_in_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("runner:\n  epochs: three\n")
    assert load_error(str(path)) == f"{path}: runner.epochs: expected int, got str 'three'"
    path.write_text("runner:\n  epochs: true\n")
    assert "expected int, got bool" in load_error(str(path))


def test_require(config_path):
    config = load_config(config_path, ["hyper_parameters.note=abc"])
    assert config.require("runner.epochs", int) == 2
    assert config.require("hyper_parameters.n_way", float) == 5.0  # int accepted for float
    with pytest.raises(UserError) as missing:
        config.require("hyper_parameters.k_spt", int)
    assert str(missing.value) == f"{config_path}: hyper_parameters.k_spt: missing required key"
    with pytest.raises(UserError) as wrong:
        config.require("hyper_parameters.note", int)
    assert str(wrong.value) == f"{config_path}: hyper_parameters.note: expected int, got str 'abc'"
    with pytest.raises(UserError) as boolean:
        config.require("hyper_parameters.rotations", int)
    assert "expected int, got bool" in str(boolean.value)


def test_error_helper_formats_one_line(config_path):
    config = load_config(config_path)
    error = config.error("hyper_parameters.n_way", "must be at least 2")
    assert isinstance(error, UserError)
    assert str(error) == f"{config_path}: hyper_parameters.n_way: must be at least 2"


def test_resolve_path_is_relative_to_the_config_folder(config_path, tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    config = load_config(config_path, ["runner.model_save_path=/abs/out"])
    assert config.resolve_path("runner.train_data_dir") == os.path.join(str(tmp_path), "data", "train")
    assert config.resolve_path("runner.model_save_path") == "/abs/out"
    assert config.resolve_path("runner.model_init_path", required=False) is None
    with pytest.raises(UserError, match="runner.model_init_path: missing required key"):
        config.resolve_path("runner.model_init_path")


def test_relative_config_path_is_kept_for_messages(tmp_path, monkeypatch):
    (tmp_path / "config.yaml").write_text(textwrap.dedent(YAML))
    monkeypatch.chdir(tmp_path)
    config = load_config("config.yaml")
    assert config.path == "config.yaml"
    assert config["config_abs_dir"] == str(tmp_path)
    assert str(config.error("k", "m")) == "config.yaml: k: m"

"""Every model key has a range, not only a type (maml_settings.TABLE): values that used to run out of memory, fail
with a traceback deep inside Paddle, or silently do nothing end in one line naming the key."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import maml_modules
from tests.conftest import REPO_ROOT
from tool_helpers import assert_user_error, run_tool
from tools.utils.plugin import import_file

plugin, net, maml, kernels = maml_modules.load()
settings = maml_modules.settings()
reader = import_file(os.path.join(maml_modules.MODEL_DIR, "omniglot_reader.py"))
CONFIG = os.path.join(maml_modules.MODEL_DIR, "config.yaml")
VALID = {"hyper_parameters.n_way": 3, "hyper_parameters.k_spt": 1, "hyper_parameters.k_query": 1,
         "hyper_parameters.bn_channel": 4, "hyper_parameters.imgsize": 16}


def _model_error(**overrides):
    config = dict(VALID, **{key.replace("__", "."): value for key, value in overrides.items()})
    with pytest.raises(ValueError) as caught:
        model = plugin.DygraphModel().create_model(config)
        plugin.DygraphModel().create_optimizer(model, config)
        settings.inner_settings(config, training=False)
    return str(caught.value)


@pytest.mark.parametrize("key, value, fragment", [
    ("hyper_parameters.update_step", 1_000_000_000, "must be at most 100"),
    ("hyper_parameters.update_step_test", 101, "must be at most 100"),
    ("hyper_parameters.imgsize", 100_000, "must be at most 256"),
    ("hyper_parameters.imgsize", 2000, "must be at most 256"),
    ("hyper_parameters.bn_channel", 100_000, "must be at most 1024"),
    ("hyper_parameters.n_way", 5000, "must be at most 1000"),
    ("hyper_parameters.base_optimizer.learning_rate", math.inf, "must be a finite positive number"),
    ("hyper_parameters.meta_optimizer.learning_rate", math.inf, "must be a finite positive number"),
    ("hyper_parameters.meta_optimizer.learning_rate", math.nan, "must be a finite positive number"),
    ("hyper_parameters.meta_optimizer.class", "Optimizer", "Optimizer cannot train the meta-parameters here"),
    ("hyper_parameters.meta_optimizer.class", "LBFGS", "use one of"),
    ("hyper_parameters.conv_kernal", [100, 100], "expected a square kernel like [3, 3] (side 1 to 15)"),
])
def test_out_of_range_model_keys_are_one_error_naming_the_key(key, value, fragment):
    message = _model_error(**{key: value})
    assert message.startswith(f"{key}: ") and fragment in message, message


def test_the_optimizer_error_lists_only_usable_classes():
    message = _model_error(**{"hyper_parameters.meta_optimizer.class": "Optimizer"})
    usable = message.split("use one of ")[1].split(", ")
    assert "Adam" in usable and "SGD" in usable and "Optimizer" not in usable and "LBFGS" not in usable
    for name in usable:  # each one really trains: a step on a tiny model changes its parameters
        config = dict(VALID, **{"hyper_parameters.meta_optimizer.class": name})
        model = plugin.DygraphModel().create_model(config)
        optimizer = plugin.DygraphModel().create_optimizer(model, config)
        before = model.parameters()[0].numpy().copy()
        (model.parameters()[0] ** 2).sum().backward()
        optimizer.step()
        assert not np.array_equal(before, model.parameters()[0].numpy()), name


def test_every_table_row_is_well_formed():
    for key, row in settings.TABLE.items():
        assert key.startswith("hyper_parameters.") and row.meaning, key
        if row.high is not None:
            assert row.why and row.low is not None and row.low <= row.high, key
            if row.default is not None:
                assert row.low <= row.default <= row.high, key
    # The algorithm's own default chunk (for callers without a config) is the table's.
    assert settings.default("hyper_parameters.tasks_per_chunk") == maml.TASKS_PER_CHUNK


def test_the_reader_refuses_an_image_size_out_of_range_and_one_that_will_not_fit_in_memory(tmp_path, monkeypatch):
    character = tmp_path / "train" / "alphabet" / "character"
    character.mkdir(parents=True)
    for i in range(2):
        (character / f"{i}.png").write_bytes(_png())
    files = [str(tmp_path / "train" / "alphabet")]
    config = {"hyper_parameters.n_way": 1, "hyper_parameters.k_spt": 1, "hyper_parameters.k_query": 1}
    with pytest.raises(ValueError, match=r"^hyper_parameters\.imgsize: must be at most 256"):
        reader.RecDataset(files, dict(config, **{"hyper_parameters.imgsize": 2000}), "train")
    monkeypatch.setattr(reader, "available_memory", lambda: 1000)
    with pytest.raises(ValueError, match=r"^hyper_parameters\.imgsize: 2 images of 256x256 pixels need 0\.1 MiB "
                                         r"decoded, more than the 0\.0 MiB of memory available; use a smaller imgsize"):
        reader.RecDataset(files, dict(config, **{"hyper_parameters.imgsize": 256}), "train")
    assert not os.path.exists(tmp_path / "train" / ".cache"), "nothing is written before the check"


def _png():
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (8, 8), 255).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_trainer_ends_an_out_of_range_key_in_one_line():
    process = run_tool("trainer.py", "-m", CONFIG, "-o", "hyper_parameters.update_step=1000000000",
                       "runner.epochs=1", "runner.tasks_per_epoch=2", "runner.train_batch_size=2")
    assert_user_error(process, "hyper_parameters.update_step: must be at most 100")


_IMPORT_WITH_BAD_THREADS = r"""
import sys
sys.path.insert(0, sys.argv[1])
import dygraph_model  # a plain sys.path import of the folder: must not fail on the variable
try:
    dygraph_model.DygraphModel().create_model({"hyper_parameters.n_way": 2, "hyper_parameters.imgsize": 16})
except ValueError as error:
    print("ERROR", error)
"""


@pytest.mark.parametrize("value", ["abc", "0", "-1"])
def test_a_bad_maml_conv_threads_is_one_error_naming_the_variable(value):
    env = dict(os.environ, MAML_CONV_THREADS=value)
    imported = subprocess.run([sys.executable, "-c", _IMPORT_WITH_BAD_THREADS, maml_modules.MODEL_DIR], env=env,
                              capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert imported.returncode == 0 and "Traceback" not in imported.stderr, imported.stderr[-3000:]
    assert f"ERROR MAML_CONV_THREADS: environment variable: must be a whole number of threads >= 1" in imported.stdout
    assert repr(value) in imported.stdout
    process = run_tool("trainer.py", "-m", CONFIG, "-o", "runner.epochs=1", env={"MAML_CONV_THREADS": value})
    # The tools check the variable before Paddle starts, with the environment table's wording.
    assert_user_error(process, "environment variable MAML_CONV_THREADS:", value)



def test_every_key_of_the_table_is_documented_with_its_range():
    with open(os.path.join(REPO_ROOT, "doc", "maml.md"), encoding="utf-8") as handle:
        rows = {line.split("|")[1].strip(): line for line in handle if line.startswith("| `")}
    for key, row in settings.TABLE.items():
        name = f"`{key[len('hyper_parameters.'):]}`"
        assert name in rows, f"doc/maml.md has no row for {key}"
        if row.high is not None and key.rsplit(".", 1)[1] in ("update_step", "update_step_test", "imgsize",
                                                              "bn_channel", "n_way"):
            assert str(row.high) in rows[name], f"doc/maml.md's row for {key} does not give its bound {row.high}"

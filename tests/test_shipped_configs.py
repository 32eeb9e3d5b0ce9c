"""Every config shipped in the MAML folder passes the checks a training run would make, without data.

A typo in a shipped config (a key, a type, an epoch range, a data folder the dataset script never writes) would
otherwise show only hours into a run or at its end, in infer.
"""
import glob
import os
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.maml_modules import MODEL_DIR, load, settings
from tools.utils.config import load_config

sys.path.insert(0, os.path.join(REPO_ROOT, "datasets", "omniglot"))
import prepare  # noqa: E402  (the dataset script's own module: where run.sh writes each protocol's splits)
sys.path.insert(0, MODEL_DIR)
from omniglot_reader import _mode_key  # noqa: E402  (which key evaluation reads: the reader's own rule)

CONFIGS = sorted(glob.glob(os.path.join(MODEL_DIR, "config*.yaml")))
DATA_KEYS = ("runner.train_data_dir", "runner.valid_data_dir", "runner.test_data_dir")


def _load(path):
    plugin = load()[0]
    return plugin, load_config(path, plugin_defaults=plugin.CONFIG_DEFAULTS)


def test_the_folder_ships_the_configs_the_docs_name():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"config.yaml", "config_bigdata.yaml", "config_bigdata_1h.yaml", "config_paddlerec.yaml",
            "config_omniglot_lake_5way_1shot.yaml", "config_omniglot_lake_20way_1shot.yaml"} <= names
    assert len(names) == 10, names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_builds_model_optimizer_and_every_epoch_schedule(path):
    plugin, config = _load(path)
    model_obj = plugin.DygraphModel()
    model = model_obj.create_model(config)
    model_obj.create_optimizer(model, config)
    epochs = config.get("runner.epochs")
    for epoch in range(epochs):
        steps, _, _ = settings().inner_settings(config, True, epoch)
        weights = settings().multi_step_weights(config, epoch)
        assert abs(sum(weights.values()) - 1.0) < 1e-12 and max(weights) == steps
    settings().inner_settings(config, False)
    k_spt = config.get("hyper_parameters.k_spt")
    k_query = config.get("hyper_parameters.k_query")
    k_test = config.get("hyper_parameters.k_query_test") or k_query
    assert k_spt + max(k_query, k_test) <= 20, "Omniglot has 20 drawings per character"
    assert 0 <= config.get("runner.infer_start_epoch") < config.get("runner.infer_end_epoch") <= epochs
    assert config.get("runner.infer_load_path") in ("", config.get("runner.model_save_path"))


@pytest.mark.parametrize("path", [p for p in CONFIGS if os.path.basename(p) != "config.yaml"], ids=os.path.basename)
def test_omniglot_config_reads_folders_the_dataset_script_writes(path):
    _, config = _load(path)
    folders = {key: config.resolve_path(key, required=key != "runner.valid_data_dir") for key in DATA_KEYS}
    train = folders["runner.train_data_dir"]
    written = {name: prepare.split_dirs(prepare.HERE, protocol)
               for name, protocol in prepare.protocols.PROTOCOLS.items()}
    matches = [name for name, dirs in written.items() if dirs["train"] == train]
    assert len(matches) == 1, f"runner.train_data_dir {train} is no folder the dataset script writes"
    protocol_dirs = written[matches[0]]
    assert folders["runner.test_data_dir"] == protocol_dirs["test"]
    # Every protocol with a validation split must be validated on it; only Lake's has none.
    assert folders["runner.valid_data_dir"] == protocol_dirs.get("valid")
    # Only the MAML paper's (Vinyals) protocol tests on rotated characters; training may add rotations to any.
    evaluation_rotations = config.get(_mode_key(config, "infer", "hyper_parameters.rotations"))
    assert evaluation_rotations == (matches[0] == "vinyals")


def test_each_config_writes_its_own_output_folder():
    folders = [_load(p)[1].resolve_path("runner.model_save_path", required=False) for p in CONFIGS]
    assert len(set(folders)) == len(folders), folders


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_each_benchmark_variant_trains_at_the_order_it_names(path):
    """tools/benchmark.py times the trainer's step in epoch 0 with each variant's overrides; a second-order row
    that ran first order (a config's first_order_epochs) would be a wrong figure, not an error."""
    plugin = load()[0]
    for variant in plugin.BENCHMARK_VARIANTS:
        config = load_config(path, [f"{key}={value}" for key, value in variant.items()],
                             plugin_defaults=plugin.CONFIG_DEFAULTS)
        assert settings().inner_settings(config, True, 0)[2] == variant["hyper_parameters.first_order"]

"""tools/utils/plugin.py: importing plugins and readers from config folders."""
import re

import pytest

from tool_helpers import TOY_CONFIG
from tools.utils.config import load_config
from tools.utils.console import UserError
from tools.utils.plugin import import_plugin_module, load_model_plugin, plugin_declaration

# Paddle warns about ccache when imported; irrelevant to these tests.
pytestmark = pytest.mark.filterwarnings("ignore:No ccache found")


PLUGIN = """\
import net

CONFIG_DEFAULTS = {"hyper_parameters.size": net.SIZE}


class DygraphModel:
    def create_model(self, config):
        return ("model", net.SIZE)
"""


def make_model_folder(root, name, size):
    folder = root / name
    folder.mkdir()
    (folder / "config.yaml").write_text("hyper_parameters:\n  other: 1\n")
    (folder / "dygraph_model.py").write_text(PLUGIN)
    (folder / "net.py").write_text(f"SIZE = {size}\n")
    return str(folder / "config.yaml")


def test_two_model_folders_in_one_process_keep_their_own_net(tmp_path):
    first = load_config(make_model_folder(tmp_path, "first", 11))
    second = load_config(make_model_folder(tmp_path, "second", 22))
    assert load_model_plugin(first).create_model(first) == ("model", 11)
    assert load_model_plugin(second).create_model(second) == ("model", 22)
    assert load_model_plugin(first).create_model(first) == ("model", 11)
    assert plugin_declaration(import_plugin_module(second), "CONFIG_DEFAULTS") == {"hyper_parameters.size": 22}
    assert import_plugin_module(first).__name__ != import_plugin_module(second).__name__


def test_a_plugin_that_leaves_methods_out_gets_the_base_class_defaults(tmp_path):
    """What a DygraphModel leaves out is ModelPlugin's: a no-op or no metrics, else one line naming the folder."""
    config = load_config(make_model_folder(tmp_path, "partial", 3))
    plugin = load_model_plugin(config)
    assert plugin.create_model(config) == ("model", 3) and plugin.create_metrics() == ([], [])
    assert plugin.set_epoch(1) is None and plugin.has("create_model") and not plugin.has("predict")
    for call, method in [(lambda: plugin.train_forward(None, [], [], config), "train_forward"),
                         (lambda: plugin.create_optimizer(None, config), "create_optimizer"),
                         (lambda: plugin.require("ensemble", config.config_dir), "ensemble")]:
        with pytest.raises(UserError, match=f"^{re.escape(config.config_dir)}: the model plugin's DygraphModel has "
                                            f"no {method}\\(\\) method"):
            call()


def test_missing_plugin_names_the_folder(tmp_path):
    (tmp_path / "config.yaml").write_text("runner:\n  epochs: 1\n")
    config = load_config(str(tmp_path / "config.yaml"))
    with pytest.raises(UserError) as caught:
        load_model_plugin(config)
    assert str(tmp_path) in str(caught.value) and "dygraph_model.py" in str(caught.value)


@pytest.mark.parametrize("override, fragment", [
    ("runner.train_data_dir=null", "runner.train_data_dir: missing required key"),
    ("runner.train_data_dir=/nonexistent/data", "runner.train_data_dir: data folder /nonexistent/data does not exist"),
    ("runner.train_reader_path=no_such_reader", "runner.train_reader_path: no module file"),
    ("runner.train_batch_size=null", "runner.train_batch_size: missing required key"),
])
def test_data_loader_errors_name_the_key(override, fragment):
    from tools.utils.plugin import create_data_loader

    config = load_config(TOY_CONFIG, [override])
    with pytest.raises(UserError) as caught:
        create_data_loader(config, "train")
    assert fragment in str(caught.value)

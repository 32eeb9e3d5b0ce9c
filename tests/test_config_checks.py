"""models/multitask/maml/maml_settings.py: the plugin and the reader read their settings through the same
checks, so the same bad value gets the same one-line error from both."""
import os

import pytest

from tests import maml_modules
from tools.utils.plugin import import_file

plugin, _, _, _ = maml_modules.load()
reader = import_file(os.path.join(maml_modules.MODEL_DIR, "omniglot_reader.py"))

VALID = {"hyper_parameters.n_way": 5, "hyper_parameters.k_spt": 1, "hyper_parameters.k_query": 15,
         "hyper_parameters.imgsize": 28}


@pytest.mark.parametrize("key, value, message", [
    ("hyper_parameters.n_way", True, "must be a positive integer, got True"),
    ("hyper_parameters.n_way", 2.0, "must be a positive integer, got 2.0"),
    ("hyper_parameters.imgsize", 0, "must be a positive integer, got 0"),
    ("hyper_parameters.n_way", None, "missing required key"),
])
def test_the_plugin_and_the_reader_report_a_bad_value_alike(key, value, message):
    config = dict(VALID, **{key: value})
    with pytest.raises(ValueError) as from_plugin:
        plugin.DygraphModel().create_model(config)
    with pytest.raises(ValueError) as from_reader:
        reader.RecDataset(["/nonexistent/alphabet"], config, mode="train")
    assert str(from_plugin.value) == str(from_reader.value) == f"{key}: {message}"

"""hyper_parameters.n_way_test: training tasks with n_way classes, validation and test tasks with fewer, which use
the first n_way_test outputs of the head (the rest are masked out of adaptation and prediction)."""

import numpy as np
import paddle
import pytest

from tests import maml_modules
from tests.test_reader import config, entries, make_tree, sample  # noqa: F401  (sample: the reader tests' fixture)
from tests.test_validation import MAML_CONFIG, MAML_SMALL, read_records
from tool_helpers import assert_ok, assert_user_error, run_tool
from omniglot_reader import RecDataset  # noqa: E402  (tests.test_reader put the model folder on sys.path)

dygraph_model, net, maml, _ = maml_modules.load()


def test_reader_uses_n_way_test_only_when_evaluating(sample):  # noqa: F811
    cfg = config(hyper_parameters__n_way=8, hyper_parameters__n_way_test=5, hyper_parameters__k_query=2)
    train = RecDataset(entries(sample / "train"), cfg, "train")
    assert train.n_way == 8 and train.task(0, 0)[0].shape[0] == 8
    for mode in ("valid", "infer"):
        evaluation = RecDataset(entries(sample / "test"), cfg, mode)
        x_spt, y_spt, x_qry, y_qry = evaluation.task(0, 0)
        assert evaluation.n_way == 5 and x_spt.shape[0] == 5 and x_qry.shape[0] == 10
        assert sorted(y_spt.tolist()) == list(range(5))  # labels 0..4: the head's first five outputs
    # unset: evaluation uses n_way, exactly the tasks it drew before the key existed
    for a, b in zip(RecDataset(entries(sample / "test"), config(hyper_parameters__n_way=5), "infer").task(0, 1),
                    RecDataset(entries(sample / "test"), config(hyper_parameters__n_way=5,
                                                                hyper_parameters__n_way_test=None), "infer").task(0, 1)):
        np.testing.assert_array_equal(a, b)


def test_within_alphabet_checks_name_n_way_test(tmp_path):
    tree = make_tree(tmp_path / "test", {"Alpha": {f"c{c}": 4 for c in range(3)},
                                         "Beta": {f"c{c}": 4 for c in range(6)}}, size=28)
    cfg = config(hyper_parameters__n_way=6, hyper_parameters__n_way_test=4, hyper_parameters__k_query=2,
                 hyper_parameters__task_sampling="within_alphabet")
    with pytest.raises(ValueError, match=r"^hyper_parameters\.task_sampling: within_alphabet: 1 alphabet\(s\) of "
                                         r".* have fewer than n_way_test = 4 characters: Alpha \(3\); lower "
                                         r"hyper_parameters\.n_way_test, or set"):
        RecDataset(entries(tree), cfg, "infer")
    with pytest.raises(ValueError, match=r"^hyper_parameters\.n_way_test: n_way_test = 10 but .* has only 9 "):
        RecDataset(entries(tree), dict(cfg, **{"hyper_parameters.n_way_test": 10}), "valid")


CONFIG = {"hyper_parameters.n_way": 5, "hyper_parameters.bn_channel": 4, "hyper_parameters.imgsize": 16,
          "hyper_parameters.update_step_test": 2}


def _batch(ways, tasks=4, queries=5):
    rng = np.random.default_rng(3)
    return [rng.standard_normal((tasks, ways, 1, 16, 16)).astype("float32"), np.tile(np.arange(ways), (tasks, 1)),
            rng.standard_normal((tasks, queries * ways, 1, 16, 16)).astype("float32"),
            np.tile(np.arange(ways).repeat(queries), (tasks, 1))]


def _accuracy(model, batch, cfg):
    plugin = dygraph_model.DygraphModel()
    metrics, _ = plugin.infer_forward(model, plugin.create_metrics()[0], batch, cfg)
    return metrics[0].accumulate()


def test_evaluation_uses_the_first_n_way_test_outputs():
    paddle.seed(0)
    model = dygraph_model.DygraphModel().create_model(CONFIG)
    # Outputs 3 and 4 far ahead of the others: a prediction among all five outputs is always 3 or 4.
    bias = dict(model.named_parameters())["fc_bias"]
    bias.set_value(np.array([0, 0, 0, 100, 100], dtype="float32"))
    batch = _batch(3)
    assert _accuracy(model, batch, CONFIG) == 0.0  # without n_way_test: never one of the labels 0..2
    masked = _accuracy(model, batch, dict(CONFIG, **{"hyper_parameters.n_way_test": 3}))
    assert masked > 0.2
    expected = maml.evaluate(model, maml.MetaBatch(*batch, dtype="float32", classes=3), 2, 0.1).numpy().mean()
    assert masked == pytest.approx(float(expected))
    # n_way_test equal to n_way is the same as unset
    full = _batch(5)
    assert _accuracy(model, full, dict(CONFIG, **{"hyper_parameters.n_way_test": 5})) == _accuracy(model, full, CONFIG)


def test_n_way_test_above_n_way_is_one_line():
    with pytest.raises(ValueError, match=r"^hyper_parameters\.n_way_test: 6 classes per evaluation task, but the "
                                         r"network has n_way = 5 outputs; use at most 5$"):
        dygraph_model.DygraphModel().create_model(dict(CONFIG, **{"hyper_parameters.n_way_test": 6}))
    with pytest.raises(ValueError, match=r"^hyper_parameters\.n_way_test: must be a positive integer, got 0"):
        dygraph_model.DygraphModel().create_model(dict(CONFIG, **{"hyper_parameters.n_way_test": 0}))


def test_trainer_trains_8_way_and_validates_and_tests_5_way(tmp_path):
    out = tmp_path / "out"
    common = [f"runner.model_save_path={out}", *MAML_SMALL, "hyper_parameters.n_way=8",
              "hyper_parameters.n_way_test=5"]
    trained = run_tool("trainer.py", "-m", MAML_CONFIG, "-o", *common, "runner.epochs=1",
                       "runner.valid_data_dir=data/test", "runner.valid_tasks=4")
    assert_ok(trained)
    assert [record["tasks"] for record in read_records(out / "metrics.jsonl", "valid")] == [4]
    inferred = run_tool("infer.py", "-m", MAML_CONFIG, "-o", *common, f"runner.infer_load_path={out}",
                        "runner.infer_start_epoch=0", "runner.infer_end_epoch=1")
    assert_ok(inferred)
    assert "(95% CI, 10 tasks)" in inferred.stdout
    refused = run_tool("infer.py", "-m", MAML_CONFIG, "-o", *common, f"runner.infer_load_path={out}",
                       "runner.infer_start_epoch=0", "runner.infer_end_epoch=1", "hyper_parameters.n_way_test=9")
    assert_user_error(refused, "hyper_parameters.n_way_test: 9 classes per evaluation task, but the network has "
                               "n_way = 8 outputs; use at most 8")

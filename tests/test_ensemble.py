"""runner.infer_ensemble: infer.py evaluates the N best validated epochs as one model, which the model plugin's
ensemble() makes (MAML: each member adapts on its own, class probabilities averaged)."""
import json

import numpy as np
import paddle
import paddle.nn.functional as F

from tests import maml_modules
from tests.test_validation import MAML_CONFIG, MAML_SMALL, read_best, read_records, validated  # noqa: F401
from tool_helpers import TOY_CONFIG, assert_ok, assert_user_error, run_tool

dygraph_model, net, maml, _ = maml_modules.load()
WAYS, STEPS, LR = 3, 2, 0.3
CONFIG = {"hyper_parameters.n_way": WAYS, "hyper_parameters.bn_channel": 4, "hyper_parameters.imgsize": 16}


def _models_and_batch():
    models = []
    for seed in (0, 1):
        paddle.seed(seed)
        models.append(dygraph_model.DygraphModel().create_model(CONFIG))
    rng = np.random.default_rng(2)
    batch = maml.MetaBatch(rng.standard_normal((4, WAYS, 1, 16, 16)), np.tile(np.arange(WAYS), (4, 1)),
                           rng.standard_normal((4, 5 * WAYS, 1, 16, 16)), np.tile(np.arange(WAYS).repeat(5), (4, 1)),
                           dtype="float32")
    return models, batch


def test_an_ensemble_averages_its_members_adapted_class_probabilities():
    (first, second), batch = _models_and_batch()
    probabilities = [F.softmax(maml.query_logits(m, batch, STEPS, LR), axis=-1).numpy() for m in (first, second)]
    expected = (np.mean(probabilities, axis=0).argmax(-1) == batch.y_qry.numpy()).mean(axis=1)
    ensemble = maml.evaluate(maml.Ensemble([first, second]), batch, STEPS, LR).numpy()
    np.testing.assert_allclose(ensemble, expected)
    alone = [maml.evaluate(m, batch, STEPS, LR).numpy() for m in (first, second)]
    assert not any(np.array_equal(expected, a) for a in alone)  # the data tells the ensemble from either member
    np.testing.assert_allclose(maml.evaluate(maml.Ensemble([first, first]), batch, STEPS, LR).numpy(), alone[0])


def test_ranked_epochs_best_first_and_earlier_among_equals(tmp_path):
    from tools.utils.evaluation import ModelSelection, best_epochs_of

    history = [{"epoch": e, "checkpoint": None, "values": {"acc": a}} for e, a in
               [(0, 0.5), (1, 0.7), (2, None), (3, 0.7), (4, 0.6)]]
    assert [e["epoch"] for e in ModelSelection("x", "acc", "max", history=history).ranked] == [1, 3, 4, 0]
    assert [e["epoch"] for e in ModelSelection("x", "acc", "min", history=history).ranked] == [0, 4, 1, 3]
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"epoch": 1, "metric": "acc", "mode": "max", "value": 0.7, "history": history}))
    assert best_epochs_of(str(path), 3)[0] == [1, 3, 4]
    assert best_epochs_of(str(path))[0] == [1]


def test_infer_ensemble_of_the_maml_plugin_evaluates_the_best_epochs_as_one(tmp_path):
    out = tmp_path / "out"
    assert_ok(run_tool("trainer.py", "-m", MAML_CONFIG, "-o", f"runner.model_save_path={out}", *MAML_SMALL,
                       "runner.epochs=3", "runner.valid_data_dir=data/test", "runner.valid_tasks=6"))
    ranked = sorted(read_best(out)["history"], key=lambda e: (-e["values"]["acc"], e["epoch"]))
    top = [entry["epoch"] for entry in ranked[:2]]
    process = run_tool("infer.py", "-m", MAML_CONFIG, "-o", f"runner.infer_load_path={out}", *MAML_SMALL,
                       "runner.infer_best=True", "runner.infer_ensemble=2", "runner.infer_tasks=10")
    assert_ok(process)
    assert f"evaluating the ensemble of epochs {top[0]}, {top[1]}, the 2 best by validation acc" in process.stdout
    (record,) = read_records(out / "infer_metrics.jsonl", "infer")
    assert record["epochs"] == top and record["ensemble"] == 2 and record["best"] is True
    assert [c.rsplit("/", 1)[-1] for c in record["checkpoints"]] == [str(e) for e in top]
    assert record["tasks"] == 10 and 0.0 <= record["acc"] <= 1.0


def test_a_plugin_without_an_ensemble_hook_is_one_line(validated):  # noqa: F811
    out, _ = validated
    process = run_tool("infer.py", "-m", TOY_CONFIG, "-o", f"runner.infer_load_path={out}", "runner.infer_best=True",
                       "runner.infer_ensemble=2")
    assert_user_error(process, "runner.infer_ensemble", "no ensemble() method")
    assert not (out / "infer_metrics.jsonl").exists()


def test_more_members_than_validated_epochs_or_no_infer_best_is_one_line(validated):  # noqa: F811
    out, _ = validated
    process = run_tool("infer.py", "-m", TOY_CONFIG, "-o", f"runner.infer_load_path={out}", "runner.infer_best=True",
                       "runner.infer_ensemble=9")
    assert_user_error(process, str(out / "best.json"), "4 validated epoch(s)", "fewer than runner.infer_ensemble = 9")
    process = run_tool("infer.py", "-m", TOY_CONFIG, "-o", f"runner.infer_load_path={out}", "runner.infer_ensemble=2")
    assert_user_error(process, "runner.infer_ensemble", "needs runner.infer_best: True")

"""MAML through the generic tools on the shipped synthetic sample: train, resume, infer, and the model's bad
inputs. Settings are shrunk with -o (few small tasks, 1 inner step) so the whole file runs in seconds."""
import json
import os

import numpy as np
import pytest

from tool_helpers import REPO_ROOT, assert_ok, assert_user_error, run_tool

MAML_DIR = os.path.join(REPO_ROOT, "models", "multitask", "maml")
CONFIG = os.path.join(MAML_DIR, "config.yaml")
SMALL = ["runner.train_batch_size=4", "runner.tasks_per_epoch=8", "runner.infer_batch_size=5",
         "runner.infer_tasks=10", "hyper_parameters.k_query=3", "hyper_parameters.update_step=1",
         "hyper_parameters.update_step_test=2", "hyper_parameters.bn_channel=8", "runner.print_interval=1"]


def _train(out, *extra, cwd=REPO_ROOT, script_path=None, config=CONFIG):
    return run_tool("trainer.py", "-m", config, "-o", f"runner.model_save_path={out}", *SMALL, *extra,
                    cwd=cwd, script_path=script_path)


def _params(path):
    import paddle

    return {k: v.numpy() for k, v in paddle.load(str(path)).items()}


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    out = tmp_path_factory.mktemp("maml") / "out"
    process = _train(out, "runner.epochs=2")
    assert_ok(process)
    return out, process


def test_trains_logs_and_checkpoints(two_epochs):
    out, process = two_epochs
    for epoch in ("0", "1"):
        assert {"rec.pdparams", "rec.pdopt"} <= set(os.listdir(out / epoch))
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in records if r.get("event") == "train"]
    assert len(train) == 4  # 2 epochs x 2 meta-batches of 4 tasks
    assert all(np.isfinite(r["loss"]) and 0.0 <= r["acc"] <= 1.0 for r in train)
    assert "epoch: 1, batch_id: 1" in process.stdout


def test_resume_continues_to_the_same_parameters(two_epochs, tmp_path):
    out, _ = two_epochs
    first = tmp_path / "first"
    assert_ok(_train(first, "runner.epochs=1"))
    resumed = tmp_path / "resumed"
    process = _train(resumed, "runner.epochs=2", f"runner.resume_path={first / '0'}")
    assert_ok(process)
    assert not os.path.exists(resumed / "0")  # epoch 0 came from the checkpoint
    reference, got = _params(out / "1" / "rec.pdparams"), _params(resumed / "1" / "rec.pdparams")
    for name in reference:
        np.testing.assert_array_equal(got[name], reference[name], err_msg=name)


def test_seed_way_from_the_model_folder(tmp_path):
    process = _train(tmp_path / "out", "runner.epochs=1", cwd=MAML_DIR, script_path="../../../tools/trainer.py",
                     config="config.yaml")
    assert_ok(process)
    assert os.path.isfile(tmp_path / "out" / "0" / "rec.pdparams")


def test_infer_reports_mean_and_confidence_interval_over_all_tasks(two_epochs):
    out, _ = two_epochs
    process = run_tool("infer.py", "-m", CONFIG, "-o", f"runner.infer_load_path={out}", "runner.infer_start_epoch=0",
                       "runner.infer_end_epoch=2", *SMALL)
    assert_ok(process)
    records = [json.loads(line) for line in open(out / "infer_metrics.jsonl")]
    assert [r["epoch"] for r in records] == [0, 1]
    for r in records:
        assert r["tasks"] == 10 and 0.0 <= r["acc"] <= 1.0 and r["acc_ci95"] > 0
        assert r["settings"] == {"hyper_parameters.norm_mode": "support"}  # the mode it evaluated with
    assert "(95% CI, 10 tasks)" in process.stdout


def test_first_order_flag_through_the_tools(two_epochs, tmp_path):
    """first_order=True reaches the model: same data and initial parameters as two_epochs (second order, the
    config's default), so the first meta-batch's loss agrees, but the updates, made with the first-order
    meta-gradient, give other parameters (epoch 0 of a run does not depend on runner.epochs: see the resume test)."""
    second_order, _ = two_epochs
    first_order = tmp_path / "out"
    assert_ok(_train(first_order, "runner.epochs=1", "hyper_parameters.first_order=True"))

    def first_loss(out):
        return next(json.loads(line)["loss"] for line in open(out / "metrics.jsonl") if '"train"' in line)

    assert first_loss(first_order) == pytest.approx(first_loss(second_order), rel=1e-6)
    ours, theirs = _params(first_order / "0" / "rec.pdparams"), _params(second_order / "0" / "rec.pdparams")
    difference = max(float(np.abs(ours[name] - theirs[name]).max()) for name in theirs)
    print(f"max |param(first order) - param(second order)| after epoch 0: {difference:.3g}")
    assert all(np.isfinite(value).all() for value in ours.values()) and difference > 1e-6


@pytest.mark.parametrize("override, fragments", [
    ("hyper_parameters.n_way=61", ["n_way"]),                  # the sample's train split has 40 characters
    ("hyper_parameters.k_query=20", ["k_query"]),              # k_spt + k_query > 20 drawings
    ("hyper_parameters.imgsize=8", ["hyper_parameters.imgsize"]),  # too small for 4 conv+pool blocks
    ("hyper_parameters.meta_optimizer.class=Adamm", ["hyper_parameters.meta_optimizer.class"]),
    ("hyper_parameters.first_order=maybe", ["hyper_parameters.first_order"]),
    ("hyper_parameters.n_way=0", ["n_way"]),
    ("hyper_parameters.multi_step_loss_epochs=-2", ["hyper_parameters.multi_step_loss_epochs"]),
])
def test_bad_model_settings_are_one_line_errors(tmp_path, override, fragments):
    process = _train(tmp_path / "out", "runner.epochs=1", override)
    assert_user_error(process, "config.yaml", *fragments)
    assert not os.path.exists(tmp_path / "out" / "0")


def test_bad_evaluation_query_count_is_a_one_line_error(two_epochs):
    out, _ = two_epochs
    process = run_tool("infer.py", "-m", CONFIG, "-o", f"runner.infer_load_path={out}", "runner.infer_start_epoch=0",
                       "runner.infer_end_epoch=1", *SMALL, "hyper_parameters.k_query_test=20")
    assert_user_error(process, "config.yaml", "hyper_parameters.k_query_test", "exceeds the 20")


def test_checkpoint_that_does_not_match_the_config(two_epochs):
    out, _ = two_epochs
    process = run_tool("infer.py", "-m", CONFIG, "-o", f"runner.infer_load_path={out}", "runner.infer_start_epoch=0",
                       "runner.infer_end_epoch=1", *SMALL, "hyper_parameters.n_way=3")
    assert_user_error(process, "rec.pdparams", "fc_weight")


MAML_PLUS_PLUS = ["hyper_parameters.update_step=2", "hyper_parameters.multi_step_loss_epochs=2",
                  "hyper_parameters.learn_inner_lr=True", "hyper_parameters.per_step_bn=True",
                  "hyper_parameters.meta_optimizer.cosine_annealing=True", "hyper_parameters.first_order_epochs=1"]


def test_maml_plus_plus_options_through_the_tools_and_resume(tmp_path):
    """All five options on: training runs, the learned rates move, the meta rate follows the cosine over
    the 4 meta-batches of the run, and a run resumed from the first epoch's checkpoint continues the same
    curve to the same parameters; resumed with more epochs, the curve stretches over the longer run."""
    straight, resumed, longer = tmp_path / "straight", tmp_path / "resumed", tmp_path / "longer"
    assert_ok(_train(straight, "runner.epochs=2", *MAML_PLUS_PLUS))

    def rates(out):
        return [r["lr"] for r in map(json.loads, open(out / "metrics.jsonl")) if r.get("event") == "train"]

    def cosine(steps, total, base=0.003):  # config.yaml's meta_optimizer.learning_rate
        return [base / 100 + (base - base / 100) * (1 + np.cos(np.pi * step / total)) / 2 for step in steps]

    np.testing.assert_allclose(rates(straight), cosine(range(4), 4), rtol=1e-6)
    params = _params(straight / "1" / "rec.pdparams")
    inner_lr = next(v for k, v in params.items() if "inner_lr" in k)
    assert inner_lr.shape == (2, 6) and np.abs(inner_lr - 0.1).max() > 1e-6  # 4 convs + fc weight, bias

    assert_ok(_train(resumed, "runner.epochs=2", f"runner.resume_path={straight / '0'}", *MAML_PLUS_PLUS))
    np.testing.assert_allclose(rates(resumed), cosine([2, 3], 4), rtol=1e-6)
    got = _params(resumed / "1" / "rec.pdparams")
    for name in params:
        np.testing.assert_allclose(got[name], params[name], rtol=1e-5, atol=1e-6, err_msg=name)

    assert_ok(_train(longer, "runner.epochs=3", f"runner.resume_path={straight / '0'}", *MAML_PLUS_PLUS))
    np.testing.assert_allclose(rates(longer), cosine([2, 3, 4, 5], 6), rtol=1e-6)

    # Test-time adaptation with the learned rates and per-step batch norm (3 steps: beyond the trained 2).
    process = run_tool("infer.py", "-m", CONFIG, "-o", f"runner.infer_load_path={straight}", "runner.infer_start_epoch=1",
                       "runner.infer_end_epoch=2", *SMALL, "hyper_parameters.update_step_test=3", *MAML_PLUS_PLUS)
    assert_ok(process)
    record = json.loads(open(straight / "infer_metrics.jsonl").readline())
    assert record["tasks"] == 10 and 0.0 <= record["acc"] <= 1.0

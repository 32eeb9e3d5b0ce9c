"""Validation during training and best-epoch selection (runner.valid_*, best.json, runner.infer_best).

Mostly the toy plugin through the tools as subprocesses (about 1-2 s per run), plus one tiny MAML run on
the shipped sample and one 2-process launch. The toy's validation uses its test folder, so validation and
infer see the same samples and their figures can be compared exactly.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from tool_helpers import REPO_ROOT, TOOLS_DIR, TOY_CONFIG, TOY_DIR, assert_ok, assert_user_error, run_tool

pytestmark = pytest.mark.filterwarnings("ignore:No ccache found")

MAML_DIR = os.path.join(REPO_ROOT, "models", "multitask", "maml")
MAML_CONFIG = os.path.join(MAML_DIR, "config.yaml")
MAML_SMALL = ["runner.train_batch_size=4", "runner.tasks_per_epoch=8", "runner.infer_batch_size=5",
              "runner.infer_tasks=10", "hyper_parameters.k_query=3", "hyper_parameters.update_step=1",
              "hyper_parameters.update_step_test=2", "hyper_parameters.bn_channel=8", "runner.print_interval=1"]
# Selecting on the highest cross-entropy picks an early epoch (the model improves), so the best is not the
# last epoch; the tests still check the choice against the recorded values.
VALID = ["runner.valid_data_dir=data/test", "runner.valid_tasks=300", "runner.valid_metric=xent",
         "runner.valid_mode=max"]


def read_records(path, event=None):
    with open(path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    return [record for record in records if event is None or record["event"] == event]


def read_best(folder):
    with open(os.path.join(folder, "best.json"), encoding="utf-8") as handle:
        return json.load(handle)


def train_toy(out, *extra, config=TOY_CONFIG):
    return run_tool("trainer.py", "-m", config, "-o", f"runner.model_save_path={out}", *extra)


def selected(records, key, mode):
    """The epoch a correct selection picks: best value, earliest on ties."""
    pick = max if mode == "max" else min
    best = pick(record[key] for record in records)
    return min(record["epoch"] for record in records if record[key] == best)


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    """Four epochs, validated after each one."""
    out = tmp_path_factory.mktemp("validated") / "out"
    process = train_toy(out, "runner.epochs=4", *VALID)
    assert_ok(process)
    return out, process


def test_every_epoch_is_validated_and_the_best_is_recorded(validated):
    out, process = validated
    records = read_records(out / "metrics.jsonl", "valid")
    assert [record["epoch"] for record in records] == [0, 1, 2, 3]
    for record in records:
        assert record["samples"] == 300 and 0.8 < record["acc"] <= 1.0 and record["checkpoint"] == str(out / str(record["epoch"]))
        assert f"valid epoch {record['epoch']}: acc {record['acc']:.4f} ± " in process.stdout
    assert "(95% CI, 300 samples)" in process.stdout
    best = read_best(out)
    expected = selected(records, "xent", "max")
    assert best["epoch"] == expected
    assert expected != 3, "the case should have its best before the last epoch"
    assert (best["metric"], best["mode"]) == ("xent", "max")
    record = records[expected]
    assert best["value"] == record["xent"] and best["values"]["acc"] == record["acc"]
    assert best["checkpoint"] == str(out / str(expected))
    assert [entry["epoch"] for entry in best["history"]] == [0, 1, 2, 3]
    assert [record["best_epoch"] for record in records] == [
        selected(records[:index + 1], "xent", "max") for index in range(4)]
    assert f"best epoch: {expected} by validation xent (max): acc " in process.stdout
    # The validation ran after each checkpoint was written.
    events = [(record["event"], record.get("epoch")) for record in read_records(out / "metrics.jsonl")
              if record["event"] in ("epoch", "valid")]
    assert events == [(event, epoch) for epoch in range(4) for event in ("epoch", "valid")]
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # no temporary files left


def test_interval_min_mode_and_stale_best_json(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "best.json").write_text('{"epoch": 7, "history": []}')  # from an earlier run in this folder
    process = train_toy(out, "runner.epochs=3", "runner.valid_data_dir=data/test", "runner.valid_interval=2",
                        "runner.valid_metric=xent", "runner.valid_mode=min")
    assert_ok(process)
    assert f"removed {out / 'best.json'} of an earlier run" in process.stdout
    records = read_records(out / "metrics.jsonl", "valid")
    assert [record["epoch"] for record in records] == [1, 2]  # every 2nd epoch, and the last
    assert read_best(out)["epoch"] == selected(records, "xent", "min")
    # Without validation, a fresh start (which must ask to replace the old run) leaves no best.json behind either.
    process = train_toy(out, "runner.epochs=1", "runner.overwrite=True")
    assert_ok(process)
    assert not (out / "best.json").exists() and not read_records(out / "metrics.jsonl", "valid")


def test_resume_keeps_the_best_so_far(validated, tmp_path):
    full, _ = validated
    out = tmp_path / "out"
    assert_ok(train_toy(out, "runner.epochs=2", *VALID))
    first = read_best(out)
    process = train_toy(out, "runner.epochs=4", "runner.resume_path=auto", *VALID)
    assert_ok(process)
    assert "continuing at epoch 2" in process.stdout
    assert f"best epoch so far (from {out / 'best.json'}): {first['epoch']}" in process.stdout
    records = read_records(out / "metrics.jsonl", "valid")
    assert [record["epoch"] for record in records] == [0, 1, 2, 3]
    # The resumed run validates exactly like the uninterrupted one, and selects among all four epochs.
    reference = read_records(full / "metrics.jsonl", "valid")
    assert [(r["acc"], r["xent"]) for r in records] == [(r["acc"], r["xent"]) for r in reference]
    best = read_best(out)
    assert best["epoch"] == selected(records, "xent", "max") == read_best(full)["epoch"]
    assert [entry["epoch"] for entry in best["history"]] == [0, 1, 2, 3]
    # Resuming from an earlier epoch drops the results of the epochs that are trained again.
    process = train_toy(out, "runner.epochs=2", f"runner.resume_path={out / '0'}", *VALID)
    assert_ok(process)
    assert "dropped the validation results of epoch(s) [1, 2, 3]" in process.stdout
    assert [entry["epoch"] for entry in read_best(out)["history"]] == [0, 1]


def test_infer_best_evaluates_the_selected_epoch(validated):
    out, _ = validated
    best = read_best(out)
    process = run_tool("infer.py", "-m", TOY_CONFIG, "-o", f"runner.infer_load_path={out}", "runner.infer_best=True",
                       "runner.infer_tasks=300", "runner.infer_start_epoch=0", "runner.infer_end_epoch=1")
    assert_ok(process)
    assert f"runner.infer_best: evaluating epoch {best['epoch']}" in process.stdout
    records = read_records(out / "infer_metrics.jsonl", "infer")
    assert len(records) == 1 and records[0]["epoch"] == best["epoch"] and records[0]["best"] is True
    # Same evaluation loop, same samples: infer reproduces the validation figures of that epoch.
    assert (records[0]["acc"], records[0]["xent"]) == (best["values"]["acc"], best["values"]["xent"])


@pytest.mark.parametrize("content", [None, "{not json", '{"epoch": "three", "history": []}'])
def test_infer_best_without_a_usable_best_json(tmp_path, content):
    if content is not None:
        (tmp_path / "best.json").write_text(content)
    process = run_tool("infer.py", "-m", TOY_CONFIG, "-o", f"runner.infer_load_path={tmp_path}",
                       "runner.infer_best=True")
    line = assert_user_error(process, str(tmp_path / "best.json"))
    assert ("not found" if content is None else "corrupt") in line


@pytest.mark.parametrize("override, fragments", [
    ("runner.valid_mode=median", ["runner.valid_mode", "median"]),
    ("runner.valid_interval=0", ["runner.valid_interval"]),
    ("runner.valid_data_dir=no_such_folder", ["runner.valid_data_dir", "no_such_folder", "does not exist"]),
])
def test_bad_validation_settings_fail_before_training(tmp_path, override, fragments):
    process = train_toy(tmp_path / "out", "runner.valid_data_dir=data/test", override)
    assert_user_error(process, TOY_CONFIG, *fragments)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_unknown_valid_metric_names_the_results(tmp_path):
    process = train_toy(tmp_path / "out", "runner.epochs=2", "runner.valid_data_dir=data/test",
                        "runner.valid_metric=auc")
    assert_user_error(process, "runner.valid_metric", "'auc'", "acc, acc_ci95, samples, xent")
    assert (tmp_path / "out" / "0" / "rec.pdparams").exists() and not (tmp_path / "out" / "1").exists()


def test_plugin_evaluation_note_is_printed_once(tmp_path):
    plugin = tmp_path / "toy"
    shutil.copytree(TOY_DIR, plugin, ignore=shutil.ignore_patterns("output_*", "__pycache__"))
    with open(plugin / "dygraph_model.py", "a", encoding="utf-8") as handle:
        handle.write('\nEVALUATION_NOTE = "dropout off, no gradients"\n')
    config = plugin / "config.yaml"
    process = train_toy(tmp_path / "out", "runner.epochs=2", "runner.valid_data_dir=data/test", config=config)
    assert_ok(process)
    assert process.stdout.count("evaluation: dropout off, no gradients") == 1
    assert process.stdout.rstrip().splitlines()[-2].endswith(" - INFO - evaluation: dropout off, no gradients")
    process = run_tool("infer.py", "-m", config, "-o", f"runner.infer_load_path={tmp_path / 'out'}")
    assert_ok(process)
    assert process.stdout.rstrip().splitlines()[-1].endswith(" - INFO - evaluation: dropout off, no gradients")


def test_maml_sample_with_validation(tmp_path):
    out = tmp_path / "out"
    process = run_tool("trainer.py", "-m", MAML_CONFIG, "-o", f"runner.model_save_path={out}", *MAML_SMALL,
                       "runner.epochs=2", "runner.valid_data_dir=data/test", "runner.valid_tasks=6")
    assert_ok(process)
    records = read_records(out / "metrics.jsonl", "valid")
    assert [record["epoch"] for record in records] == [0, 1]
    assert all(record["tasks"] == 6 and 0.0 <= record["acc"] <= 1.0 for record in records)
    assert "(95% CI, 6 tasks)" in process.stdout
    assert read_best(out)["epoch"] == selected(records, "acc", "max")


def test_validation_reader_mode_and_config_view():
    """The MAML reader declares mode "valid" (its own task stream); the toy reader does not and gets "infer".
    Both see runner.valid_tasks as runner.infer_tasks; a bad value is reported under runner.valid_tasks."""
    from tools.utils.config import load_config
    from tools.utils.plugin import create_dataset
    from tools.utils.console import UserError
    from tools.utils.evaluation import validation_config

    maml = load_config(MAML_CONFIG, ["runner.valid_data_dir=data/test", "runner.valid_tasks=6"])
    view = validation_config(maml)
    dataset = create_dataset(view, "valid")
    assert dataset.mode == "valid" and len(dataset) == 6
    assert maml["runner.infer_tasks"] == 200 and view["runner.infer_tasks"] == 6
    test_tasks = create_dataset(view, "infer")
    assert [list(test_tasks.episode(0, i).y_qry) for i in range(3)] != [
        list(dataset.episode(0, i).y_qry) for i in range(3)]
    with pytest.raises(UserError, match="runner.valid_tasks: must be from 1 to"):  # the loader's range check
        load_config(MAML_CONFIG, ["runner.valid_data_dir=data/test", "runner.valid_tasks=0"])
    maml["runner.valid_tasks"] = 0  # past the loader, the reader's own check names the key the user set
    with pytest.raises(UserError, match="runner.valid_tasks: must be a positive integer"):
        create_dataset(validation_config(maml), "valid")
    toy = create_dataset(validation_config(load_config(TOY_CONFIG, ["runner.valid_data_dir=data/test",
                                                                    "runner.valid_tasks=30"])), "valid")
    assert toy.stream == 1 and toy.num_samples == 30  # the toy reader's infer stream


def test_selection_rules(tmp_path, capsys):
    from tools.utils.evaluation import ModelSelection, read_best_file

    selection = ModelSelection(str(tmp_path / "best.json"), "acc", "max")
    assert selection.add(0, "c0", {"acc": float("nan")}) is False  # non-finite never wins
    assert selection.add(1, "c1", {"acc": 0.5}) is True
    assert selection.add(2, "c2", {"acc": 0.5}) is False  # ties keep the earlier epoch
    assert selection.add(3, "c3", {"xent": 0.1}) is False  # metric missing
    assert selection.add(4, "c4", {"acc": 0.6}) is True
    selection.save()
    data = read_best_file(str(tmp_path / "best.json"))
    assert (data["epoch"], data["value"], data["checkpoint"]) == (4, 0.6, "c4")
    assert data["history"][0]["values"]["acc"] is None  # NaN written as null
    assert math.isclose(data["history"][1]["values"]["acc"], 0.5)
    capsys.readouterr()
    path = str(tmp_path / "best.json")
    resumed, changed = ModelSelection.resume(path, ModelSelection(path, "acc", "min"), before_epoch=3)
    assert resumed.best["epoch"] == 1 and [entry["epoch"] for entry in resumed.history] == [0, 1, 2]
    notes = capsys.readouterr().out
    assert changed and "dropped the validation results of epoch(s) [3, 4]" in notes and "now by acc (min)" in notes


def test_data_parallel_validation_matches_one_process(tmp_path):
    """2 ranks (gloo) validate on their shares; the merged figures and best.json equal one process's."""
    settings = ["runner.epochs=2", "hyper_parameters.dropout=0.0", "runner.valid_data_dir=data/test",
                "runner.valid_tasks=301"]  # uneven shares
    single = tmp_path / "single"
    assert_ok(train_toy(single, *settings))
    dist = tmp_path / "dist"
    command = [sys.executable, "-m", "paddle.distributed.launch", "--log_dir", str(tmp_path / "log"),
               "--nproc_per_node", "2", os.path.join(TOOLS_DIR, "trainer.py"), "-m", TOY_CONFIG,
               "-o", f"runner.model_save_path={dist}", "runner.use_fleet=True", *settings]
    env = {key: value for key, value in os.environ.items() if key != "TOY_FAULT"}
    process = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert_ok(process)
    ours, theirs = read_records(dist / "metrics.jsonl", "valid"), read_records(single / "metrics.jsonl", "valid")
    assert [record["samples"] for record in ours] == [301, 301]
    for mine, reference in zip(ours, theirs):
        assert mine["acc"] == reference["acc"] and mine["xent"] == pytest.approx(reference["xent"], abs=1e-6)
    assert read_best(dist)["epoch"] == read_best(single)["epoch"]
    assert "[rank 0/2] valid epoch 1: acc " in process.stdout

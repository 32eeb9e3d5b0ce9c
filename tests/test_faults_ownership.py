"""A run owns only what it writes (doc/reliability.md): the trainer never truncates, replaces or deletes a file or
folder it did not write, and refuses in one line naming the path instead. On the toy plugin, through the real
trainer and infer, each under the subprocess timeout of tool_helpers.run_tool."""
import os
import shutil

import pytest

from tool_helpers import TOY_CONFIG, assert_ok, assert_user_error, run_tool

pytestmark = pytest.mark.filterwarnings("ignore:No ccache found")


def train(out, *overrides):
    return run_tool("trainer.py", "-m", TOY_CONFIG, "-o", f"runner.model_save_path={out}", "runner.epochs=1",
                    *overrides)


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    assert_ok(train(out))
    return out


@pytest.fixture
def run_copy(one_epoch, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(one_epoch, out)
    return out


def contents(path):
    with open(path, "rb") as handle:
        return handle.read()


@pytest.mark.parametrize("victim", ["checkpoint", "config", "other_metrics"])
def test_metrics_path_on_a_file_the_run_did_not_write_is_refused(run_copy, tmp_path, victim):
    """runner.metrics_path on an existing file used to truncate it and write metrics lines into it."""
    config_copy = tmp_path / "config.yaml"
    shutil.copy(TOY_CONFIG, config_copy)
    path = {"checkpoint": run_copy / "0" / "rec.pdparams", "config": config_copy,
            "other_metrics": run_copy / "metrics.jsonl"}[victim]
    before = contents(path)
    process = train(tmp_path / "new", f"runner.metrics_path={path}")
    assert_user_error(process, str(path), "runner.metrics_path")
    assert contents(path) == before
    assert not (tmp_path / "new" / "0").exists()


def test_metrics_path_of_another_run_is_replaced_only_with_overwrite(run_copy, tmp_path):
    path = run_copy / "metrics.jsonl"
    process = train(tmp_path / "new", f"runner.metrics_path={path}", "runner.overwrite=True")
    assert_ok(process)
    assert contents(path).count(b'"event": "start"') == 1


def test_metrics_path_may_be_a_new_file_or_a_character_device(tmp_path):
    assert_ok(train(tmp_path / "a", f"runner.metrics_path={tmp_path / 'm' / 'metrics.jsonl'}"))
    assert (tmp_path / "m" / "metrics.jsonl").is_file()
    assert_ok(train(tmp_path / "b", "runner.metrics_path=/dev/null"))


def test_folders_named_by_numbers_that_hold_no_checkpoint_are_the_users(tmp_path):
    """A run folder holding 2024/img.jpg and 7/notes.txt was refused as 'checkpoints of another run (epochs 7,
    2024)', and runner.overwrite=True then deleted both folders."""
    out = tmp_path / "out"
    (out / "2024").mkdir(parents=True)
    (out / "2024" / "img.jpg").write_bytes(b"\xff\xd8 a photo")
    (out / "7").mkdir()
    (out / "7" / "notes.txt").write_text("notes")
    for overrides in ((), ("runner.overwrite=True",), ("runner.resume_path=auto",)):
        process = train(out, *overrides)
        assert_ok(process)
        assert "checkpoints of another run" not in process.stderr
        assert (out / "2024" / "img.jpg").read_bytes() == b"\xff\xd8 a photo"
        assert (out / "7" / "notes.txt").read_text() == "notes"
        shutil.rmtree(out / "0")
        os.remove(out / "metrics.jsonl")


def test_overwrite_keeps_a_users_folder_where_a_checkpoint_would_go(run_copy):
    """Saving epoch 0 replaces the folder 0 as a whole: a folder 0 that is not a checkpoint is refused."""
    shutil.rmtree(run_copy / "0")
    (run_copy / "0").mkdir()
    (run_copy / "0" / "notes.txt").write_text("mine")
    for overrides in ((), ("runner.overwrite=True",)):
        assert_user_error(train(run_copy, *overrides), str(run_copy / "0"), "not a checkpoint")
        assert (run_copy / "0" / "notes.txt").read_text() == "mine"


def test_overwrite_removes_only_the_checkpoints_and_run_files(run_copy):
    (run_copy / "0" / "notes.txt").write_text("mine")  # a checkpoint folder the user added to is no longer ours
    (run_copy / "3").mkdir()
    (run_copy / "3" / "rec.pdparams").write_bytes(b"x")
    (run_copy / "best.json").write_text("my own notes, not JSON\n")
    shutil.copytree(run_copy / "0", run_copy / "00")  # no trainer names an epoch folder so: the user's copy
    process = train(run_copy, "runner.overwrite=True", "runner.epochs=1")
    assert_user_error(process, str(run_copy / "0"), "not a checkpoint")
    os.remove(run_copy / "0" / "notes.txt")
    process = train(run_copy, "runner.overwrite=True")
    assert_user_error(process, str(run_copy / "best.json"), "not a best.json file")
    os.remove(run_copy / "best.json")
    assert_ok(train(run_copy, "runner.overwrite=True"))
    assert sorted(os.listdir(run_copy)) == ["0", "00", "metrics.jsonl"]


def test_a_fresh_start_keeps_a_best_json_that_is_not_the_trainers(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "best.json").write_text("[1, 2, 3]\n")
    assert_user_error(train(out), str(out / "best.json"))
    assert (out / "best.json").read_text() == "[1, 2, 3]\n"


@pytest.mark.parametrize("where", ["itself", "parent"])
def test_model_save_path_that_is_a_file_is_one_line_saying_so(tmp_path, where):
    """It used to read '.../afile/.trainer.lock: cannot lock the run folder: File exists', like a stale lock."""
    afile = tmp_path / "afile"
    afile.write_text("keep")
    out = afile if where == "itself" else afile / "run"
    assert_user_error(train(out), "runner.model_save_path", f"{afile} is a file, not a folder")
    assert afile.read_text() == "keep"


def test_infer_appends_only_to_its_own_results_file(run_copy):
    results = run_copy / "infer_metrics.jsonl"
    results.write_text("a user's notes\n")
    process = run_tool("infer.py", "-m", TOY_CONFIG, "-o", f"runner.infer_load_path={run_copy}",
                       "runner.infer_start_epoch=0", "runner.infer_end_epoch=1")
    assert_user_error(process, str(results), "not a metrics file")
    assert results.read_text() == "a user's notes\n"


def test_predict_writes_its_json_only_over_an_earlier_predictions_file(tmp_path):
    victim = tmp_path / "config.yaml"
    shutil.copy(TOY_CONFIG, victim)
    (tmp_path / "support" / "a").mkdir(parents=True)
    process = run_tool("predict.py", "-m", TOY_CONFIG, "--support", tmp_path / "support", "--query", tmp_path,
                       "--json", victim)
    assert_user_error(process, str(victim), "--json", "not a predictions file")
    assert contents(victim) == contents(TOY_CONFIG)


def test_plot_metrics_writes_its_chart_only_over_a_png(one_epoch, tmp_path):
    victim = tmp_path / "notes.txt"
    victim.write_text("mine")
    process = run_tool("plot_metrics.py", one_epoch / "metrics.jsonl", "-o", victim)
    assert_user_error(process, str(victim), "-o", "not a PNG file")
    assert victim.read_text() == "mine"
    chart = tmp_path / "curve.png"
    for _ in range(2):  # the second run replaces the chart of the first
        assert_ok(run_tool("plot_metrics.py", one_epoch / "metrics.jsonl", "-o", chart))
    assert contents(chart).startswith(b"\x89PNG")

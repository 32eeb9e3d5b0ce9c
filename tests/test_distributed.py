"""Data-parallel trainer and infer under `python -m paddle.distributed.launch` (2 CPU processes, gloo).

One meta-step on 2 ranks must equal one single-process meta-step on the union of their tasks (up to float
rounding), 2-rank evaluation must report the single-process figures, a dead or hung rank must end the job
quickly with a visible error (faults injected by the toy reader, TOY_FAULT), and runner.resume_path=auto must
resume from the newest checkpoint.
Settings are tiny; every launcher run writes its logs into tmp_path (--log_dir).
"""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from tool_helpers import REPO_ROOT, TOOLS_DIR, TOY_CONFIG, assert_ok, assert_user_error, run_tool

MAML_CONFIG = os.path.join(REPO_ROOT, "models", "multitask", "maml", "config.yaml")
# 9 tasks in batches of 4 (for training and for evaluation): the last batch has 1 task, so rank 0 gets no share of
# it and must still take the step (training) or wait for rank 1 (evaluation).
MAML_SMALL = ["runner.train_batch_size=4", "runner.tasks_per_epoch=9", "hyper_parameters.k_query=2",
              "hyper_parameters.update_step=1", "hyper_parameters.bn_channel=8", "runner.epochs=1",
              "runner.print_interval=1", "runner.infer_batch_size=4", "hyper_parameters.update_step_test=1",
              "runner.infer_tasks=9", "runner.infer_start_epoch=0", "runner.infer_end_epoch=1"]
# Dropout off: with random masks no two runs with different sharding could agree.
TOY_SMALL = ["runner.epochs=2", "hyper_parameters.dropout=0.0", "runner.infer_end_epoch=2"]
FAULT = "TOY_FAULT"  # tests/toy_model/toy_reader.py: RANK:exit or RANK:hang
TOLERANCE = 1e-6  # max abs parameter difference allowed between 1 and 2 processes
# A job with a dead or hung rank must end by itself: subprocess.run's timeout fails the test otherwise. Far above
# what the job needs even on a loaded machine (seconds), far below what a hang would last (the default
# runner.sync_timeout is 1800 s; the hang test sets 3 s).
FAULT_TIMEOUT = 600


def launch(tool, log_dir, *args, env=None, timeout=120):
    """Run tools/<tool> on 2 CPU processes through Paddle's launcher; CompletedProcess plus .seconds."""
    command = [sys.executable, "-m", "paddle.distributed.launch", "--log_dir", str(log_dir), "--nproc_per_node", "2",
               os.path.join(TOOLS_DIR, tool), *map(str, args)]
    process_env = {key: value for key, value in os.environ.items() if key != FAULT}
    process_env.update(env or {})
    start = time.monotonic()
    process = subprocess.run(command, cwd=REPO_ROOT, env=process_env, capture_output=True, text=True, timeout=timeout)
    process.seconds = time.monotonic() - start
    return process


def worker_log(log_dir, rank):
    with open(os.path.join(log_dir, f"workerlog.{rank}"), encoding="utf-8", errors="replace") as handle:
        return handle.read()


def params(path):
    import paddle

    return {name: value.numpy() for name, value in paddle.load(str(path)).items()}


def max_difference(first, second):
    a, b = params(first), params(second)
    assert sorted(a) == sorted(b)
    return max(float(np.abs(a[name] - b[name]).max()) for name in a)


def records(path, event):
    with open(path, encoding="utf-8") as handle:
        return [record for record in map(json.loads, handle) if record["event"] == event]


@pytest.fixture(scope="module")
def maml_runs(tmp_path_factory):
    """One epoch (meta-steps of 4, 4 and 1 tasks) trained by 1 and by 2 processes."""
    root = tmp_path_factory.mktemp("maml_dp")
    single = run_tool("trainer.py", "-m", MAML_CONFIG, "-o", f"runner.model_save_path={root / 'single'}", *MAML_SMALL)
    assert_ok(single)
    dist = launch("trainer.py", root / "log", "-m", MAML_CONFIG, "-o", f"runner.model_save_path={root / 'dist'}",
                  "runner.use_fleet=True", *MAML_SMALL)
    assert_ok(dist)
    return root, single, dist


def test_two_ranks_take_the_single_process_meta_steps(maml_runs):
    root, _, dist = maml_runs
    difference = max_difference(root / "single" / "0" / "rec.pdparams", root / "dist" / "0" / "rec.pdparams")
    print(f"max |param(1 process) - param(2 processes)| after 3 meta-steps: {difference:.3g}")
    assert difference <= TOLERANCE
    # The logged figures are those of the whole meta-batch, not of rank 0's half.
    ones, twos = records(root / "single" / "metrics.jsonl", "train"), records(root / "dist" / "metrics.jsonl", "train")
    assert [r["tasks"] for r in twos] == [r["tasks"] for r in ones] == [4, 8, 9]
    assert [r["avg_samples"] for r in twos] == [r["avg_samples"] for r in ones] == [4, 4, 1]
    for one, two in zip(ones, twos):
        assert two["loss"] == pytest.approx(one["loss"], abs=1e-5)
        assert two["acc"] == pytest.approx(one["acc"], abs=1e-9)
    assert records(root / "dist" / "metrics.jsonl", "start")[0]["world_size"] == 2


def test_rank_zero_speaks_and_writes_alone(maml_runs):
    root, _, dist = maml_runs
    assert "[rank 0/2] epoch: 0, batch_id: 1" in dist.stdout  # the launcher shows rank 0's log
    assert "[rank 0/2] epoch: 0 done" in worker_log(root / "log", 0)
    quiet = worker_log(root / "log", 1)
    assert "epoch:" not in quiet and "[rank 1/2]" not in quiet
    assert sorted(os.listdir(root / "dist")) == ["0", "metrics.jsonl"]


def test_two_rank_infer_reports_the_single_process_figures(maml_runs):
    root, _, _ = maml_runs
    checkpoints = root / "single"
    common = ["-m", MAML_CONFIG, "-o", f"runner.infer_load_path={checkpoints}", *MAML_SMALL]
    assert_ok(run_tool("infer.py", *common))
    dist = launch("infer.py", root / "infer_log", *common, "runner.use_fleet=True")
    assert_ok(dist)
    one, two = records(checkpoints / "infer_metrics.jsonl", "infer")  # rank 1 wrote nothing
    print(f"1 process: acc {one['acc']} ± {one['acc_ci95']}; 2 processes: acc {two['acc']} ± {two['acc_ci95']}")
    assert two["tasks"] == one["tasks"] == 9 and two["samples"] == 9 and two["batches"] == one["batches"] == 3
    assert two["acc"] == pytest.approx(one["acc"], abs=1e-12)
    assert two["acc_ci95"] == pytest.approx(one["acc_ci95"], abs=1e-12)
    assert "[rank 0/2] epoch 0: acc" in dist.stdout and "(95% CI, 9 tasks)" in dist.stdout


def test_toy_model_train_and_infer_match_single_process(tmp_path):
    single, dist = tmp_path / "single", tmp_path / "dist"
    assert_ok(run_tool("trainer.py", "-m", TOY_CONFIG, "-o", f"runner.model_save_path={single}", *TOY_SMALL))
    assert_ok(launch("trainer.py", tmp_path / "log", "-m", TOY_CONFIG, "-o", f"runner.model_save_path={dist}",
                     "runner.use_fleet=True", *TOY_SMALL))
    for epoch in ("0", "1"):  # Adam with a StepDecay schedule, 12 steps per epoch
        assert max_difference(single / epoch / "rec.pdparams", dist / epoch / "rec.pdparams") <= TOLERANCE
    assert_ok(launch("infer.py", tmp_path / "infer_log", "-m", TOY_CONFIG, "-o", f"runner.infer_load_path={dist}",
                     "runner.use_fleet=True", *TOY_SMALL))
    assert_ok(run_tool("infer.py", "-m", TOY_CONFIG, "-o", f"runner.infer_load_path={dist}", *TOY_SMALL))
    two, one = records(dist / "infer_metrics.jsonl", "infer")[:2], records(dist / "infer_metrics.jsonl", "infer")[2:]
    for a, b in zip(one, two):
        assert (a["epoch"], a["samples"], a["acc"]) == (b["epoch"], b["samples"], b["acc"])
        assert b["xent"] == pytest.approx(a["xent"], rel=1e-6)


def test_a_rank_that_dies_ends_the_job_with_an_error(tmp_path):
    process = launch("trainer.py", tmp_path / "log", "-m", TOY_CONFIG, "-o",
                     f"runner.model_save_path={tmp_path / 'out'}", "runner.use_fleet=True", *TOY_SMALL,
                     env={FAULT: "1:exit"}, timeout=FAULT_TIMEOUT)
    print(f"launcher exit {process.returncode} after {process.seconds:.1f} s")  # a figure, not an assertion
    assert process.returncode != 0
    assert "TOY_FAULT=1:exit (test)" in worker_log(tmp_path / "log", 1)
    # Rank 0's own log: the launcher copies it to its output only until it stops the ranks (within a second of
    # rank 1's death), which may come before rank 0 has written its line on a loaded machine.
    errors = [line for line in worker_log(tmp_path / "log", 0).splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    assert errors[0].startswith("[rank 0/2] error: epoch 0, batch 0: gradient all-reduce: collective failed")
    assert "another rank has probably died" in errors[0]
    assert "Traceback" not in worker_log(tmp_path / "log", 0)
    assert not (tmp_path / "out" / "0").exists()


def test_a_sigterm_during_a_failing_collective_does_not_hide_its_error():
    """Paddle's launcher SIGTERMs the other ranks (up to 3 times) as soon as one dies; a rank whose collective
    fails meanwhile must still end with the collective's error line, not "terminated" or a traceback."""
    script = """if 1:
        import os, signal, sys
        from tools.utils.console import on_signal, run_tool
        from tools.utils.distributed import Ranks

        def failing_all_reduce():
            for _ in range(3):
                os.kill(os.getpid(), signal.SIGTERM)
            raise RuntimeError("Connection closed by peer")

        signal.signal(signal.SIGTERM, on_signal)
        sys.exit(run_tool(lambda _: Ranks(0, 2)._collective("batch 0: gradient all-reduce", failing_all_reduce), 0))
    """
    process = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=120)
    assert process.returncode == 3, process.stderr
    assert process.stderr.strip() == ("error: batch 0: gradient all-reduce: collective failed (Connection closed by "
                                      "peer); another rank has probably died (see workerlog.<rank> in the "
                                      "launcher's --log_dir)")


def test_a_rank_that_hangs_ends_the_job_after_sync_timeout(tmp_path):
    process = launch("trainer.py", tmp_path / "log", "-m", TOY_CONFIG, "-o",
                     f"runner.model_save_path={tmp_path / 'out'}", "runner.use_fleet=True", "runner.sync_timeout=3",
                     *TOY_SMALL, env={FAULT: "1:hang"}, timeout=FAULT_TIMEOUT)
    print(f"launcher exit {process.returncode} after {process.seconds:.1f} s")  # a figure, not an assertion
    assert process.returncode != 0
    assert "[rank 0/2] error: epoch 0: start: waited 3 s (runner.sync_timeout) for rank(s) [1]" in process.stdout


def test_launched_ranks_without_use_fleet_are_refused(tmp_path):
    process = launch("trainer.py", tmp_path / "log", "-m", TOY_CONFIG, "-o",
                     f"runner.model_save_path={tmp_path / 'out'}", "runner.epochs=1", timeout=90)
    assert process.returncode != 0
    # The first rank to refuse exits, and the launcher then stops the other at once: on a loaded machine that one
    # may not have got as far as the check (made before Paddle is imported, so a rank reaches it in moments).
    logs = [worker_log(tmp_path / "log", rank) for rank in (0, 1)]
    refusal = f"error: {TOY_CONFIG}: runner.use_fleet: False, but the launcher started 2 processes"
    for rank, text in enumerate(logs):  # the refusal line alone, or nothing from a rank stopped before its check
        assert text == "" or (text.startswith(f"[rank {rank}/2] {refusal}") and text.count("\n") == 1), text
    assert any(logs)
    assert not (tmp_path / "out").exists()


def test_batch_size_must_split_over_the_ranks():
    from tools.utils.config import load_config
    from tools.utils.plugin import loader_batch_size
    from tools.utils.console import UserError

    config = load_config(TOY_CONFIG, ["runner.train_batch_size=6"])
    assert loader_batch_size(config, "train", 2) == 3
    with pytest.raises(UserError, match=r"runner.train_batch_size: 6 cannot be split evenly over 4"):
        loader_batch_size(config, "train", 4)


# ----- runner.resume_path=auto -----

def test_latest_checkpoint_is_the_newest_complete_epoch_folder(tmp_path):
    from tools.utils.checkpoint import PARAMS_FILE, latest_checkpoint

    assert latest_checkpoint(str(tmp_path / "missing")) is None
    for name in ("1", "10", "2", ".11.saving-x", "12", "notes"):  # 12: no params file, not a checkpoint
        os.makedirs(tmp_path / name)
        if name != "12":
            (tmp_path / name / PARAMS_FILE).write_bytes(b"")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "10")


def test_auto_starts_fresh_then_resumes_like_an_uninterrupted_run(tmp_path):
    out, whole = tmp_path / "out", tmp_path / "whole"
    first = run_tool("trainer.py", "-m", TOY_CONFIG, "-o", f"runner.model_save_path={out}",
                     "runner.resume_path=auto", "runner.epochs=1")
    assert_ok(first)
    assert "runner.resume_path=auto: no checkpoint" in first.stdout and "starting fresh" in first.stdout
    again = run_tool("trainer.py", "-m", TOY_CONFIG, "-o", f"runner.model_save_path={out}",
                     "runner.resume_path=auto", "runner.epochs=2")
    assert_ok(again)
    assert f"resumed from {out / '0'}: continuing at epoch 1" in again.stdout
    assert_ok(run_tool("trainer.py", "-m", TOY_CONFIG, "-o", f"runner.model_save_path={whole}", "runner.epochs=2"))
    assert max_difference(out / "1" / "rec.pdparams", whole / "1" / "rec.pdparams") == 0.0
    starts = records(out / "metrics.jsonl", "start")
    assert [s["resumed_from"] for s in starts] == [None, str(out / "0")]


def test_restarted_two_rank_job_resumes_from_the_last_checkpoint(maml_runs, tmp_path):
    """Relaunch the 2-rank job of maml_runs (1 epoch done) with epochs=2 and auto: it must continue at epoch 1
    and end where a single process that trained both epochs ends."""
    root, _, _ = maml_runs
    out = tmp_path / "dist"
    shutil.copytree(root / "dist", out)
    process = launch("trainer.py", tmp_path / "log", "-m", MAML_CONFIG, "-o", f"runner.model_save_path={out}",
                     "runner.use_fleet=True", *MAML_SMALL, "runner.epochs=2", "runner.resume_path=auto")
    assert_ok(process)
    assert f"[rank 0/2] resumed from {out / '0'}: continuing at epoch 1" in process.stdout
    single = tmp_path / "single"
    assert_ok(run_tool("trainer.py", "-m", MAML_CONFIG, "-o", f"runner.model_save_path={single}", *MAML_SMALL,
                       "runner.epochs=2"))
    assert max_difference(single / "1" / "rec.pdparams", out / "1" / "rec.pdparams") <= TOLERANCE


def test_use_fleet_without_a_launcher_is_a_clear_error(tmp_path):
    process = run_tool("trainer.py", "-m", TOY_CONFIG, "-o", f"runner.model_save_path={tmp_path / 'out'}",
                       "runner.use_fleet=True")
    assert_user_error(process, "runner.use_fleet", "no distributed launcher started this process")

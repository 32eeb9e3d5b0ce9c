"""Faults, hostile files and misuse, through the real tools (doc/reliability.md).

Each test reproduces one way a trainer used to hang, crash, run a file's code
or mix two runs, on the toy plugin (a training epoch takes well under a
second). Every subprocess runs under a timeout, so a hang fails the test.
"""
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tool_helpers import REPO_ROOT, TOOLS_DIR, TOY_CONFIG, TOY_DIR, assert_ok, assert_user_error, run_tool

pytestmark = pytest.mark.filterwarnings("ignore:No ccache found")
LONG_EPOCH = "runner.tasks_per_epoch=1000000"  # minutes per epoch: a trainer that is still running


def train(out, *overrides, config=TOY_CONFIG):
    return run_tool("trainer.py", "-m", config, "-o", f"runner.model_save_path={out}", *overrides)


def infer(out, *overrides):
    return run_tool("infer.py", "-m", TOY_CONFIG, "-o", f"runner.infer_load_path={out}", "runner.infer_start_epoch=0",
                    "runner.infer_end_epoch=1", *overrides)


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory):
    out = tmp_path_factory.mktemp("three") / "out"
    assert_ok(train(out, "runner.epochs=3"))
    return out


@pytest.fixture
def run_copy(three_epochs, tmp_path):
    """A private copy of the three-epoch run, to damage."""
    out = tmp_path / "out"
    shutil.copytree(three_epochs, out)
    return out


def snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, folder)] = handle.read()
    return files


def start_trainer(out, *overrides, config=TOY_CONFIG):
    """A trainer in the background, returned once it is training (its first metrics record is written)."""
    command = [sys.executable, "-u", os.path.join(TOOLS_DIR, "trainer.py"), "-m", config, "-o",
               f"runner.model_save_path={out}", *overrides]
    metrics = out / "metrics.jsonl"
    old_records = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (metrics.is_file() and '"event": "train"' in "".join(metrics.read_text().splitlines()[old_records:])):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the trainer did not start training: {process.communicate(timeout=30)}")
        time.sleep(0.2)
    return process


def assert_sigterm_ends_it_in_one_line(process):
    """Send SIGTERM to a running tool: it must end like Ctrl-C, with exit 143 and one error line, no traceback
    and no C++ dump, within 60 s."""
    try:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines() == ["error: terminated (SIGTERM)"], stderr
    assert "Traceback" not in stderr and "FatalError" not in stderr


# ----- defect 2: a checkpoint never runs code ---------------------------------------------------------

class RunsCode:
    """Unpickles to os.system(<command>): what a hostile checkpoint does."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def hostile_state(real_path, marker, protocol):
    """The real state dict of `real_path` with a payload hidden beside the weights."""
    import paddle

    state = dict(paddle.load(str(real_path), return_numpy=True))
    state["payload"] = RunsCode(f"touch {marker}")
    return pickle.dumps(state, protocol=protocol)


def test_a_checkpoint_that_would_run_code_is_refused_by_infer(run_copy, tmp_path):
    marker = tmp_path / "code_ran"
    params = run_copy / "0" / "rec.pdparams"
    params.write_bytes(hostile_state(params, marker, 2))
    process = infer(run_copy)
    assert_user_error(process, str(params), "refused", "posix.system")
    assert not marker.exists()


def test_an_optimizer_state_that_would_run_code_is_refused_on_resume(run_copy, tmp_path):
    marker = tmp_path / "code_ran"
    optimizer_state = run_copy / "2" / "rec.pdopt"
    optimizer_state.write_bytes(hostile_state(optimizer_state, marker, 4))
    process = train(run_copy, "runner.epochs=4", "runner.resume_path=auto")
    assert_user_error(process, str(optimizer_state), "refused")
    assert not marker.exists()
    assert not (run_copy / "3").exists()


def tiny_model():
    import paddle

    model = paddle.nn.Linear(3, 2)
    optimizer = paddle.optimizer.Adam(parameters=model.parameters(),
                                      learning_rate=paddle.optimizer.lr.StepDecay(0.1, step_size=2))
    model(paddle.ones([4, 3])).sum().backward()
    optimizer.step()
    return model, optimizer


def test_genuine_paddle_save_files_of_every_protocol_still_load(tmp_path):
    """PaddleRec's files are plain paddle.save state dicts: protocol 2 pickles bytes through _codecs.encode,
    Paddle 2.1 stored a tensor as a (name, array) tuple; and a payload is refused whatever the protocol."""
    import paddle

    from tools.utils.checkpoint import load_checkpoint, save_checkpoint
    from tools.utils.console import UserError

    model, optimizer = tiny_model()
    folder = save_checkpoint(model, optimizer, str(tmp_path), 0)
    params, optimizer_file = os.path.join(folder, "rec.pdparams"), os.path.join(folder, "rec.pdopt")
    layouts = [lambda state, path, protocol=protocol: paddle.save(state, path, protocol=protocol)
               for protocol in (2, 3, 4)]
    layouts.append(lambda state, path: pickle.dump(  # Paddle 2.1: {key: (tensor name, array)}
        {key: (value.name, value.numpy()) if hasattr(value, "numpy") else value for key, value in state.items()},
        open(path, "wb"), protocol=2))
    saved_weight, saved_scheduler = model.weight.numpy().copy(), optimizer.state_dict()["LR_Scheduler"]
    for write in layouts:
        write(model.state_dict(), params)
        write(optimizer.state_dict(), optimizer_file)
        model.weight.set_value(saved_weight * 0)
        optimizer._learning_rate.step(7)  # a changed scheduler state, which the load must restore
        assert load_checkpoint(folder, model, optimizer) == 0
        assert (model.weight.numpy() == saved_weight).all()
        assert optimizer.state_dict()["LR_Scheduler"] == saved_scheduler
    for protocol in (2, 3, 4, 5):
        with open(params, "wb") as handle:
            pickle.dump({"weight": saved_weight, "x": RunsCode(f"touch {tmp_path / 'ran'}")}, handle, protocol)
        with pytest.raises(UserError) as caught:
            load_checkpoint(folder, model)
        assert not (tmp_path / "ran").exists(), f"protocol {protocol}: the checkpoint's code ran"
        assert "refused" in str(caught.value)


def test_a_state_dict_holding_more_than_arrays_names_and_numbers_is_refused(tmp_path):
    """Harmless to unpickle, but no state dict: an object array or a set would fail inside Paddle's loading."""
    from tools.utils.checkpoint import load_checkpoint, save_checkpoint
    from tools.utils.console import UserError

    model, _ = tiny_model()
    folder = save_checkpoint(model, None, str(tmp_path), 0)
    params = os.path.join(folder, "rec.pdparams")
    for odd in (np.array([{"weight": 1}], dtype=object), {1, 2}):
        with open(params, "wb") as handle:
            pickle.dump({"weight": model.weight.numpy(), "bias": odd}, handle, protocol=4)
        with pytest.raises(UserError, match=f"^{re.escape(params)}: refused: not a plain paddle.save state dict"):
            load_checkpoint(folder, model)


# ----- defect 2/3: meta.json and best.json are checked; the folder name is the epoch ------------------

HOSTILE_META = {
    "negative epoch": ('{"epoch": -3, "extra": {"step": 4}}', '"epoch" must be a non-negative integer'),
    "text step": ('{"epoch": 2, "extra": {"step": "abc"}}', '"extra.step" must be a non-negative integer'),
    "infinite step": ('{"epoch": 2, "extra": {"step": 1e400}}', '"extra.step" must be a non-negative integer'),
    "list extra": ('{"epoch": 2, "extra": []}', '"extra" must be an object'),
    "text settings": ('{"epoch": 2, "extra": {"settings": "support"}}', '"extra.settings" must be an object'),
    "deep nesting": ('{"extra": ' + "[" * 100000 + "]" * 100000 + "}", "nested"),
    "huge epoch": ('{"epoch": 1000000000, "extra": {"step": 4}}', "says epoch 1000000000, but the folder is epoch 2"),
}


def test_a_hostile_meta_json_is_one_line_not_a_hang(run_copy):
    meta = run_copy / "2" / "meta.json"
    meta.write_text(HOSTILE_META["negative epoch"][0])  # used to hang: the reader's thread died on epoch -2
    process = train(run_copy, "runner.epochs=4", "runner.resume_path=auto")  # run_tool's timeout: 120 s
    assert_user_error(process, str(meta), HOSTILE_META["negative epoch"][1])
    assert not (run_copy / "3").exists()


@pytest.mark.parametrize("case", sorted(HOSTILE_META))
def test_every_hostile_meta_json_is_refused_naming_it(tmp_path, case):
    from tools.utils.checkpoint import load_checkpoint, save_checkpoint
    from tools.utils.console import UserError

    model, optimizer = tiny_model()
    folder = save_checkpoint(model, optimizer, str(tmp_path), 2)
    content, fragment = HOSTILE_META[case]
    meta = os.path.join(folder, "meta.json")
    with open(meta, "w", encoding="utf-8") as handle:
        handle.write(content)
    with pytest.raises(UserError) as caught:
        load_checkpoint(folder, model, optimizer)
    assert str(caught.value).startswith(f"{meta}: ") and fragment in str(caught.value)


@pytest.mark.parametrize("content, fragment", [
    ('{"epoch": ' + "[" * 100000 + "]" * 100000 + "}", "nested"),
    ('{"epoch": 1, "metric": "acc", "value": "high", "history": []}', '"value" must be a finite number'),
    ('{"epoch": 1, "history": [{"epoch": 1, "values": {"acc": {"x": [1]}}}]}', '"history" must be a list'),
    ('{"epoch": 1, "history": []}' + " " * (5 * 1024 * 1024), "larger than"),
    ('{"epoch": 1, "valid_tasks": [[3]], "history": []}', '"valid_tasks" must be a count'),
], ids=["deep nesting", "text value", "nested values", "huge file", "listed tasks"])
def test_a_hostile_best_json_is_one_line(run_copy, content, fragment):
    best = run_copy / "best.json"
    best.write_text(content)
    if fragment == "nested":  # through the tool once; the other cases through the reader it uses
        assert_user_error(infer(run_copy, "runner.infer_best=True"), str(best), fragment)
        return
    from tools.utils.console import UserError
    from tools.utils.evaluation import best_epochs_of

    with pytest.raises(UserError, match=f"^{re.escape(str(best))}: .*{re.escape(fragment)}"):
        best_epochs_of(str(best))


# ----- defect 3: an exception in the loader's thread ends the run -------------------------------------

BAD_READERS = {
    "raises": ("class RecDataset(toy_reader.RecDataset):\n"
               "    def __iter__(self):\n"
               "        for index, sample in enumerate(super().__iter__()):\n"
               "            if index == 40:\n"
               "                raise KeyError('no such blob')\n"
               "            yield sample\n", "the reader failed: KeyError: 'no such blob' (bad_reader.py, line 8)"),
    "ragged samples": ("class RecDataset(toy_reader.RecDataset):\n"
                       "    def __iter__(self):\n"
                       "        for index, (point, label) in enumerate(super().__iter__()):\n"
                       "            yield [point[: 1 + index % 2], label]\n", "the reader failed: "),
}


@pytest.mark.parametrize("tool, case", [("trainer.py", "raises"), ("infer.py", "ragged samples")])
def test_an_exception_in_the_data_loader_thread_ends_the_run(tmp_path, case, tool, run_copy):
    model_dir = tmp_path / "model"
    shutil.copytree(TOY_DIR, model_dir, ignore=shutil.ignore_patterns("output*", "__pycache__"))
    source, fragment = BAD_READERS[case]
    (model_dir / "bad_reader.py").write_text("import toy_reader\n\n\n" + source)
    config = str(model_dir / "config.yaml")
    start = time.monotonic()
    process = run_tool(tool, "-m", config, "-o", f"runner.model_save_path={tmp_path / 'new'}",
                       f"runner.infer_load_path={run_copy}", "runner.infer_end_epoch=1",
                       "runner.train_reader_path=bad_reader", "runner.infer_reader_path=bad_reader")
    key = "runner.train_reader_path" if tool == "trainer.py" else "runner.infer_reader_path"
    assert_user_error(process, config, key, fragment)
    # A hang would have failed run_tool's 120 s subprocess timeout; the time is a figure, not an assertion.
    print(f"{tool} ended after {time.monotonic() - start:.1f} s")
    assert not (tmp_path / "new" / "0").exists()


# ----- defect 4: one run per folder ----------------------------------------------------------------

def test_a_fresh_start_into_a_used_folder_is_refused_and_changes_nothing(run_copy):
    before = snapshot(run_copy)
    process = train(run_copy, "runner.epochs=1")
    assert_user_error(process, str(run_copy), "epochs 0, 1, 2", "runner.overwrite=True")
    assert snapshot(run_copy) == before


def test_overwrite_replaces_the_old_run_completely(run_copy):
    (run_copy / "infer_metrics.jsonl").write_text('{"event": "infer"}\n')
    (run_copy / "best.json").write_text('{"epoch": 2, "history": []}\n')
    process = train(run_copy, "runner.epochs=1", "runner.overwrite=True")
    assert_ok(process)
    assert "removed the old run (0, 1, 2, best.json, infer_metrics.jsonl, metrics.jsonl)" in process.stdout
    assert sorted(os.listdir(run_copy)) == ["0", "metrics.jsonl"]
    events = [json.loads(line)["event"] for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert events.count("start") == 1


# ----- defects 5 and 6: the lock, SIGTERM, a killed trainer ------------------------------------------

def test_a_second_trainer_is_refused_and_sigterm_ends_the_first_cleanly(three_epochs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(three_epochs, out)
    first = start_trainer(out, "runner.epochs=4", "runner.resume_path=auto", LONG_EPOCH)
    try:
        second = train(out, "runner.epochs=4", "runner.resume_path=auto")
    finally:
        assert_sigterm_ends_it_in_one_line(first)
    assert_user_error(second, f"{out}: in use by another trainer (pid {first.pid} on host")
    assert sorted(os.listdir(out)) == ["0", "1", "2", "metrics.jsonl"]  # no lock, no half-written epoch
    resumed = train(out, "runner.epochs=4", "runner.resume_path=auto")
    assert_ok(resumed)
    assert "continuing at epoch 3" in resumed.stdout


@pytest.mark.parametrize("signum, code", [(signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_sighup_and_sigint_end_a_run_as_sigterm_does(tmp_path, signum, code):
    """A closed terminal or a dropped ssh connection (SIGHUP) used to kill the trainer by the default action: no
    error line and the lock file left behind."""
    out = tmp_path / "out"
    process = start_trainer(out, "runner.epochs=1", LONG_EPOCH)
    try:
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    name = "interrupted" if signum == signal.SIGINT else "terminated (SIGHUP)"
    assert process.returncode == code, stderr
    assert stderr.strip().splitlines() == [f"error: {name}"], stderr
    assert sorted(os.listdir(out)) == ["metrics.jsonl"]  # no lock, no partial checkpoint


def test_sigusr1_and_sigusr2_are_ignored_with_a_warning(tmp_path):
    out = tmp_path / "out"
    process = start_trainer(out, "runner.epochs=1", LONG_EPOCH)
    try:
        for signum in (signal.SIGUSR1, signal.SIGUSR2):
            process.send_signal(signum)
            time.sleep(1)
            assert process.poll() is None, "the trainer died of a user signal"
    finally:
        assert_sigterm_ends_it_in_one_line_after_warnings(process, ["SIGUSR1", "SIGUSR2"])


def assert_sigterm_ends_it_in_one_line_after_warnings(process, names):
    try:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    lines = stderr.strip().splitlines()
    assert process.returncode == 143 and lines[-1] == "error: terminated (SIGTERM)", stderr
    assert [name for name in names if any(f"WARNING - {name} received and ignored" in line for line in lines)] \
        == names, stderr


def test_sigterm_inside_the_maml_meta_gradient_is_one_line(tmp_path):
    """Most of a MAML step is spent in backward passes that Paddle runs through Python (PyLayer); a signal's
    exception raised there reaches the tool wrapped in Paddle's OSError."""
    maml = os.path.join(REPO_ROOT, "models", "multitask", "maml", "config.yaml")
    assert_sigterm_ends_it_in_one_line(start_trainer(tmp_path / "out", "runner.train_batch_size=8", LONG_EPOCH,
                                                     config=maml))


_UNWIND_SCRIPT = """
import signal, sys
sys.path.insert(0, sys.argv[2])
import paddle
from paddle.autograd import PyLayer
from tools.utils import console

class Backward(PyLayer):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, dy):
        if sys.argv[1] == "interrupt":
            console._interrupt(signal.SIGTERM)  # what the tools' SIGTERM handler does
        raise RuntimeError("an error of the model's own")

x = paddle.ones([2])
x.stop_gradient = False
try:
    paddle.grad(Backward.apply(x).sum(), x)
except BaseException as exc:
    print(type(exc).__name__)
"""


def test_an_interrupt_inside_paddles_autograd_engine_adds_no_native_warning_line():
    """The test above cannot choose where the signal lands. Raised inside a Python backward, the tools'
    interrupt unwinds through Paddle's C++ engine, which logs a glog warning ("While running Node ...") above
    the tool's own line unless the tool turns native logging down to errors as it ends. A model's own error
    there still gets Paddle's warning (the check can see it)."""
    for mode, warned in (("interrupt", False), ("error", True)):
        result = subprocess.run([sys.executable, "-c", _UNWIND_SCRIPT, mode, REPO_ROOT], capture_output=True,
                                text=True, timeout=120)
        assert result.stdout.strip(), result.stderr
        assert ("While running Node" in result.stderr) == warned, (mode, result.stderr)


def test_the_lock_and_staging_folders_of_a_killed_trainer_are_taken_over(tmp_path):
    out = tmp_path / "out"
    killed = start_trainer(out, "runner.epochs=1", LONG_EPOCH)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=30)
    for leftover in (".0.saving-x1y2", ".0.old-z3"):  # what a save killed half-way leaves
        (out / leftover / "checkpoint").mkdir(parents=True)
    process = train(out, "runner.epochs=1")
    assert_ok(process)
    assert f" - WARNING - {out}: took over the lock of pid {killed.pid} on host" in process.stderr
    assert "(that trainer is no longer running)" in process.stderr
    assert f"{out}: removed what interrupted saves left: .0.old-z3, .0.saving-x1y2" in process.stdout
    assert sorted(os.listdir(out)) == ["0", "metrics.jsonl"]


# ----- smaller items ------------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_under_the_metrics_file_is_one_line(tmp_path):
    process = train(tmp_path / "out", "runner.metrics_path=/dev/full")
    assert_user_error(process, "/dev/full: cannot write metrics: No space left on device")


def test_epochs_below_one_is_an_error(tmp_path):
    assert_user_error(train(tmp_path / "out", "runner.epochs=-1"), "runner.epochs", "must be from 1 to 2^31-1, got -1")


def test_resuming_with_another_optimizer_class_is_an_error(run_copy):
    process = train(run_copy, "runner.epochs=4", "runner.resume_path=auto", "hyper_parameters.optimizer.class=SGD")
    assert_user_error(process, str(run_copy / "2" / "rec.pdopt"), "optimizer Adam", "this run uses SGD")
    assert not (run_copy / "3").exists()


def test_a_deeply_nested_metrics_line_is_one_line_in_plot_metrics(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"event": ' + "[" * 100000 + "]" * 100000 + "}\n")
    assert_user_error(run_tool("plot_metrics.py", metrics, "-o", tmp_path / "curve.png"),
                      f"{metrics}: line 1: not valid JSON")

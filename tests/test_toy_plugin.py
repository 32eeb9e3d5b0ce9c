"""trainer.py / infer.py / plot_metrics.py end to end on the toy plugin.

The tools run as subprocesses, as users run them; every output goes to
pytest's tmp_path. Runs shared by several tests are module-scoped fixtures,
which keeps the file to a dozen short trainings (about 1-2 s each).
"""
import json
import os
import re
import shutil

import pytest

from tool_helpers import TOY_CONFIG, TOY_DIR, assert_ok, assert_user_error, run_tool


# Paddle warns about ccache when imported; irrelevant to these tests.
pytestmark = pytest.mark.filterwarnings("ignore:No ccache found")


def read_records(path, event=None):
    with open(path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    return [record for record in records if event is None or record["event"] == event]


def losses(path, epoch=None):
    return [record["loss"] for record in read_records(path, "train") if epoch is None or record["epoch"] == epoch]


def load_params(path):
    import paddle

    return {name: value.numpy() for name, value in paddle.load(str(path)).items()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Two epochs from the repository root: the reference run."""
    out = tmp_path_factory.mktemp("full") / "out"
    process = run_tool("trainer.py", "-m", TOY_CONFIG, "-o", f"runner.model_save_path={out}", "runner.epochs=2")
    assert_ok(process)
    return out, process


@pytest.fixture(scope="module")
def first_epoch_from_model_folder(tmp_path_factory):
    """One epoch, started from the model folder with a relative script path."""
    out = tmp_path_factory.mktemp("half") / "out"
    process = run_tool("trainer.py", "-m", "config.yaml", "-o", f"runner.model_save_path={out}", "runner.epochs=1",
                       cwd=TOY_DIR, script_path="../../tools/trainer.py")
    assert_ok(process)
    return out, process


def test_training_writes_paddlerec_checkpoint_layout(full_run):
    out, process = full_run
    for epoch in ("0", "1"):
        assert sorted(os.listdir(out / epoch)) == ["meta.json", "rec.pdopt", "rec.pdparams"]
    assert sorted(os.listdir(out)) == ["0", "1", "metrics.jsonl"]  # no temporary folders left
    assert "training done: epochs 0-1 (2 run)" in process.stdout
    assert f"metrics: {out / 'metrics.jsonl'}" in process.stdout
    assert "epoch: 0, batch_id: 0, loss: " in process.stdout
    assert "avg_reader_cost: " in process.stdout and "ins/s" in process.stdout


def test_metrics_file_records(full_run):
    out, _ = full_run
    records = read_records(out / "metrics.jsonl")
    assert [record["event"] for record in records].count("start") == 1
    start = records[0]
    assert start["event"] == "start" and start["device"] == "cpu" and start["seed"] == 2026
    # Set by prepare_environment() in the trainer process, before paddle started.
    assert start["environment"]["FLAGS_cudnn_deterministic"] == "1"
    # Recorded as the process saw it: the tools set no CPU-library tuning (the toy plugin sets none either).
    assert start["environment"]["MKL_DEBUG_CPU_TYPE"] == os.environ.get("MKL_DEBUG_CPU_TYPE")
    train = read_records(out / "metrics.jsonl", "train")
    assert train and {"epoch", "batch", "step", "loss", "acc", "reader_cost", "batch_cost", "ips"} <= set(train[0])
    assert [record["step"] for record in train] == sorted(record["step"] for record in train)
    # The toy's StepDecay scheduler is stepped once per batch by the trainer.
    assert train[0]["lr"] == pytest.approx(0.05)
    assert train[-1]["lr"] == pytest.approx(0.05 * 0.7 ** ((train[-1]["step"] - 1) // 8))
    epochs = read_records(out / "metrics.jsonl", "epoch")
    assert [record["epoch"] for record in epochs] == [0, 1]
    assert epochs[-1]["acc"] > 0.8  # three blobs: chance is 1/3
    assert epochs[-1]["checkpoint"] == str(out / "1")


def test_infer_reports_every_epoch(full_run):
    out, _ = full_run
    process = run_tool("infer.py", "-m", TOY_CONFIG, "-o", f"runner.infer_load_path={out}",
                       "runner.infer_start_epoch=0", "runner.infer_end_epoch=2")
    assert_ok(process)
    assert "epoch 0: acc " in process.stdout and "(95% CI, 600 samples)" in process.stdout
    records = read_records(out / "infer_metrics.jsonl", "infer")
    assert [record["epoch"] for record in records] == [0, 1]
    assert all(record["samples"] == 600 and record["acc"] > 0.8 and 0 < record["acc_ci95"] < 0.1
               for record in records)
    assert isinstance(records[0]["xent"], float)  # the float-returning metric
    # Each record says what it measured: the config, the overrides, the data folder.
    assert records[0]["config"] == os.path.abspath(TOY_CONFIG)
    assert records[0]["overrides"] == [f"runner.infer_load_path={out}", "runner.infer_start_epoch=0",
                                       "runner.infer_end_epoch=2"]
    assert records[0]["data_dir"] == os.path.join(TOY_DIR, "data", "test")  # the config's data/test, resolved


def test_infer_missing_epoch_fails_before_any_work(full_run):
    out, _ = full_run
    process = run_tool("infer.py", "-m", TOY_CONFIG, "-o", f"runner.infer_load_path={out}",
                       "runner.infer_end_epoch=5")
    line = assert_user_error(process, TOY_CONFIG, "runner.infer_start_epoch", "runner.infer_end_epoch",
                             str(out / "2" / "rec.pdparams"))
    assert "epoch 0:" not in process.stdout, line
    assert not (out / "infer_metrics.jsonl").exists() or "epoch\": 2" not in (out / "infer_metrics.jsonl").read_text()


def test_checkpoint_with_mismatched_shapes_names_the_parameter(full_run):
    out, _ = full_run
    process = run_tool("infer.py", "-m", TOY_CONFIG, "-o", f"runner.infer_load_path={out}",
                       "runner.infer_end_epoch=1", "hyper_parameters.hidden_size=8")
    assert_user_error(process, str(out / "0" / "rec.pdparams"), "hidden.weight", "[2, 16]", "[2, 8]")


def test_corrupt_checkpoint_file_is_named(tmp_path):
    bad = tmp_path / "0"
    bad.mkdir()
    (bad / "rec.pdparams").write_bytes(b"not a checkpoint")
    process = run_tool("infer.py", "-m", TOY_CONFIG, "-o", f"runner.infer_load_path={tmp_path}",
                       "runner.infer_end_epoch=1")
    assert_user_error(process, str(bad / "rec.pdparams"), "corrupt")


def test_same_seed_gives_identical_losses(full_run, first_epoch_from_model_folder):
    full_out, _ = full_run
    half_out, process = first_epoch_from_model_folder
    # Different working directory and script path, same config and seed.
    assert "training done: epochs 0-0" in process.stdout
    assert losses(half_out / "metrics.jsonl") == losses(full_out / "metrics.jsonl", epoch=0)


def test_other_seed_gives_other_losses(full_run, tmp_path):
    full_out, _ = full_run
    process = run_tool("trainer.py", "-m", TOY_CONFIG, "-o", f"runner.model_save_path={tmp_path}",
                       "runner.epochs=1", "runner.seed=7")
    assert_ok(process)
    assert losses(tmp_path / "metrics.jsonl") != losses(full_out / "metrics.jsonl", epoch=0)


def test_resume_continues_at_next_epoch_and_matches_uninterrupted_run(full_run, first_epoch_from_model_folder):
    full_out, _ = full_run
    half_out, _ = first_epoch_from_model_folder
    process = run_tool("trainer.py", "-m", TOY_CONFIG, "-o", f"runner.model_save_path={half_out}",
                       "runner.epochs=2", f"runner.resume_path={half_out / '0'}")
    assert_ok(process)
    assert "continuing at epoch 1" in process.stdout
    assert "epoch: 0, batch_id" not in process.stdout
    # Same parameters and optimizer state as the run that never stopped
    # (Adam's moments included: without them the parameters would differ).
    resumed, reference = load_params(half_out / "1" / "rec.pdparams"), load_params(full_out / "1" / "rec.pdparams")
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert (resumed[name] == reference[name]).all(), name
    assert losses(half_out / "metrics.jsonl", epoch=1) == losses(full_out / "metrics.jsonl", epoch=1)
    # The metrics file of a resumed run is appended to, and steps continue.
    records = read_records(half_out / "metrics.jsonl")
    assert [record["event"] for record in records].count("start") == 2
    full_steps = [record["step"] for record in read_records(full_out / "metrics.jsonl", "train")]
    assert [record["step"] for record in records if record["event"] == "train"] == full_steps


def test_resume_from_missing_folder_names_the_key(tmp_path):
    process = run_tool("trainer.py", "-m", TOY_CONFIG, "-o", f"runner.model_save_path={tmp_path / 'out'}",
                       f"runner.resume_path={tmp_path / 'nowhere' / '0'}")
    assert_user_error(process, TOY_CONFIG, "runner.resume_path", str(tmp_path / "nowhere" / "0"))
    assert not (tmp_path / "out").exists()


def test_model_init_path_is_a_warm_start_from_epoch_0(full_run, tmp_path):
    # PaddleRec's meaning: parameters only, training from epoch 0 (a resume of epoch 1 would train nothing).
    full_out, _ = full_run
    out = tmp_path / "warm"
    process = run_tool("trainer.py", "-m", TOY_CONFIG, "-o", f"runner.model_save_path={out}", "runner.epochs=1",
                       f"runner.model_init_path={full_out / '1'}")
    assert_ok(process)
    assert f"warm start: parameters from {full_out / '1'}" in process.stdout
    assert "epoch: 0, batch_id: 0" in process.stdout and os.path.isdir(out / "0")
    start = read_records(out / "metrics.jsonl", "start")
    assert len(start) == 1 and start[0]["start_epoch"] == 0 and start[0]["warm_start_from"] == str(full_out / "1")
    # It starts from the trained parameters: its first loss is below the random start's, near the trained one's.
    assert losses(out / "metrics.jsonl")[0] < losses(full_out / "metrics.jsonl")[0] / 2


def test_warm_start_and_resume_together_is_an_error(full_run, tmp_path):
    full_out, _ = full_run
    process = run_tool("trainer.py", "-m", TOY_CONFIG, "-o", f"runner.model_save_path={tmp_path / 'out'}",
                       f"runner.model_init_path={full_out / '0'}", "runner.resume_path=auto")
    assert_user_error(process, "runner.model_init_path", "runner.resume_path", "not both")
    process = run_tool("trainer.py", "-m", TOY_CONFIG, "-o", f"runner.model_save_path={tmp_path / 'out'}",
                       "runner.model_init_path=auto")
    assert_user_error(process, "runner.model_init_path", "use runner.resume_path=auto")
    assert not (tmp_path / "out").exists()


def test_plot_metrics_writes_a_png(full_run, tmp_path):
    out, _ = full_run
    png = tmp_path / "curve.png"
    files = [out / "metrics.jsonl"] + ([out / "infer_metrics.jsonl"] if (out / "infer_metrics.jsonl").exists() else [])
    process = run_tool("plot_metrics.py", *files, "-o", png)
    assert_ok(process)
    from PIL import Image

    with Image.open(png) as image:  # two panels (loss, acc) of 8 x 3 inches at 100 dpi
        assert image.format == "PNG" and image.size == (800, 600)
        # Not a blank canvas: the curves and text leave thousands of non-white pixels.
        assert sum(image.convert("L").point(lambda v: v < 200 and 255).histogram()[255:]) > 2000


def test_plot_metrics_draws_each_record_as_a_point():
    pytest.importorskip("matplotlib")
    from tools.plot_metrics import build_figure

    records = [{"event": "train", "epoch": 0, "step": 1, "loss": 2.0, "acc": 0.2},
               {"event": "train", "epoch": 0, "step": 3, "loss": 1.5, "acc": 0.4},
               {"event": "epoch", "epoch": 0, "step": 4},
               {"event": "train", "epoch": 1, "step": 5, "loss": 1.0, "acc": 0.6},
               {"event": "valid", "epoch": 0, "step": 4, "acc": 0.5, "acc_ci95": 0.1},
               {"event": "infer", "epoch": 0, "acc": 0.55, "acc_ci95": 0.05},  # placed at epoch 0's end, step 4
               {"event": "train", "epoch": 1, "step": 6, "loss": float("nan"), "acc": True}]  # not numbers: skipped
    figure = build_figure(records, ["loss", "acc", "xent"], "t")
    loss, acc = figure.axes  # no panel for xent, which no record has
    (loss_line,) = loss.get_lines()
    assert loss_line.get_xdata().tolist() == [1, 3, 5, 6] and not loss.containers  # nan is drawn as a gap
    train_line = acc.get_lines()[0]
    assert train_line.get_label() == "train acc"
    assert train_line.get_xdata().tolist() == [1, 3, 5] and train_line.get_ydata().tolist() == [0.2, 0.4, 0.6]
    (errorbar,) = acc.containers  # the two evaluation points with their intervals
    assert errorbar.get_label() == "eval acc (95% CI)"
    assert errorbar.lines[0].get_xdata().tolist() == [4, 4] and errorbar.lines[0].get_ydata().tolist() == [0.5, 0.55]
    assert build_figure(records, ["xent"], "t") is None


def test_plot_metrics_without_matplotlib_is_one_clear_error(full_run, tmp_path):
    out, _ = full_run
    hide = tmp_path / "no_matplotlib"
    hide.mkdir()
    (hide / "matplotlib.py").write_text("raise ImportError(\"No module named 'matplotlib'\")\n")
    process = run_tool("plot_metrics.py", out / "metrics.jsonl", "-o", tmp_path / "c.png", env={"PYTHONPATH": str(hide)})
    assert_user_error(process, "matplotlib", 'pip install -e ".[plot]"')
    assert not (tmp_path / "c.png").exists()


def test_plot_metrics_rejects_bad_input(tmp_path):
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"event": "train", "step": 1, "loss": 1.0}\nnot json\n')
    assert_user_error(run_tool("plot_metrics.py", bad), str(bad), "line 2")
    assert_user_error(run_tool("plot_metrics.py", tmp_path / "missing.jsonl"), "missing.jsonl", "not found")


@pytest.mark.parametrize("make_dir, fragment", [
    (lambda root: root / "does_not_exist", "does not exist"),
    (lambda root: (root / "empty").mkdir() or (root / "empty" / ".gitkeep").touch() or root / "empty", "is empty"),
])
def test_bad_train_data_dir_names_the_key(tmp_path, make_dir, fragment):
    data_dir = make_dir(tmp_path)
    process = run_tool("trainer.py", "-m", TOY_CONFIG, "-o", f"runner.model_save_path={tmp_path / 'out'}",
                       f"runner.train_data_dir={data_dir}")
    assert_user_error(process, TOY_CONFIG, "runner.train_data_dir", str(data_dir), fragment)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_unknown_override_from_the_command_line(tmp_path):
    process = run_tool("trainer.py", "-m", TOY_CONFIG, "-o", "runner.epoch=3")
    assert process.stderr.strip().splitlines()[-1] == (
        f"error: {TOY_CONFIG}: -o runner.epoch: unknown key (did you mean runner.epochs?)")
    assert_user_error(process)


def test_use_gpu_without_a_gpu_warns_once_and_trains_on_cpu(tmp_path):
    import paddle

    # No GPU visible, so this holds on a CUDA build too (which warns that it sees no GPU rather than no CUDA).
    process = run_tool("trainer.py", "-m", TOY_CONFIG, "-o", f"runner.model_save_path={tmp_path}",
                       "runner.epochs=1", "runner.use_gpu=True", env={"CUDA_VISIBLE_DEVICES": ""})
    assert_ok(process)
    warnings = [line for line in process.stderr.splitlines() if " - WARNING - " in line]
    expected = ("runner.use_gpu is True but no GPU is visible; running on CPU" if paddle.is_compiled_with_cuda()
                else "runner.use_gpu is True but this Paddle build has no CUDA; running on CPU")
    assert [line.split(" - WARNING - ")[1] for line in warnings] == [expected]
    assert process.stderr.strip().splitlines() == warnings  # nothing else on stderr
    assert "on cpu" in process.stdout
    assert (tmp_path / "0" / "rec.pdparams").exists()


def test_use_fleet_is_refused_clearly(tmp_path):
    process = run_tool("trainer.py", "-m", TOY_CONFIG, "-o", f"runner.model_save_path={tmp_path / 'out'}",
                       "runner.use_fleet=true")
    assert_user_error(process, TOY_CONFIG, "runner.use_fleet", "no distributed launcher", "paddle.distributed.launch")
    assert not (tmp_path / "out").exists()


# --- checkpoint atomicity (in-process: paddle.save is patched to fail) ---

def _tiny_model_and_optimizer():
    import paddle

    model = paddle.nn.Linear(2, 3)
    return model, paddle.optimizer.Adam(learning_rate=0.1, parameters=model.parameters())


def _fail_on_second_save(monkeypatch):
    import paddle

    real_save, calls = paddle.save, []

    def flaky_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("simulated failure while writing the second file")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(paddle, "save", flaky_save)
    return calls


def test_failed_save_leaves_no_epoch_folder_and_no_temp_folder(tmp_path, monkeypatch):
    from tools.utils.checkpoint import save_checkpoint

    model, optimizer = _tiny_model_and_optimizer()
    calls = _fail_on_second_save(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated failure"):
        save_checkpoint(model, optimizer, str(tmp_path), 0)
    assert len(calls) == 2
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_the_previous_checkpoint_of_that_epoch(tmp_path, monkeypatch):
    from tools.utils.checkpoint import load_checkpoint, save_checkpoint

    model, optimizer = _tiny_model_and_optimizer()
    folder = save_checkpoint(model, optimizer, str(tmp_path), 3, extra={"step": 7})
    before = (tmp_path / "3" / "rec.pdparams").read_bytes()
    weight = model.weight.numpy().copy()
    model.weight.set_value(weight + 1.0)
    _fail_on_second_save(monkeypatch)
    with pytest.raises(RuntimeError):
        save_checkpoint(model, optimizer, str(tmp_path), 3)
    assert os.listdir(tmp_path) == ["3"]
    assert (tmp_path / "3" / "rec.pdparams").read_bytes() == before
    monkeypatch.undo()
    save_checkpoint(model, optimizer, str(tmp_path), 3)  # a successful save replaces it
    assert os.listdir(tmp_path) == ["3"]
    assert (tmp_path / "3" / "rec.pdparams").read_bytes() != before
    fresh_model, fresh_optimizer = _tiny_model_and_optimizer()
    assert load_checkpoint(folder, fresh_model, fresh_optimizer) == 3
    assert (fresh_model.weight.numpy() == weight + 1.0).all()


def test_load_checkpoint_errors_name_the_file(tmp_path):
    from tools.utils.checkpoint import load_checkpoint, save_checkpoint
    from tools.utils.console import UserError

    model, optimizer = _tiny_model_and_optimizer()
    with pytest.raises(UserError, match="checkpoint folder not found"):
        load_checkpoint(str(tmp_path / "7"), model)
    folder = save_checkpoint(model, None, str(tmp_path), 0)
    assert sorted(os.listdir(folder)) == ["meta.json", "rec.pdparams"]
    with pytest.raises(UserError) as caught:
        load_checkpoint(folder, model, optimizer)
    assert str(caught.value) == f"{os.path.join(folder, 'rec.pdopt')}: checkpoint file not found"


def test_benchmark_columns_are_named_by_the_plugin(tmp_path):
    """tools/benchmark.py knows no model: without BENCHMARK_LABELS its columns are generic; a plugin names them."""
    def header(config):
        process = run_tool("benchmark.py", "-m", config, "--iterations", "1", "--warmup", "0")
        assert_ok(process)
        lines = process.stdout.splitlines()
        index = next(i for i, line in enumerate(lines) if line.startswith("variant "))
        # the seconds of the first row end where the header's "s/iter" does, however long the variant's label
        row = re.match(r"(.*?\s)([0-9.]+)\s", lines[index + 1])
        assert row.end(2) == lines[index].index("s/iter") + len("s/iter"), lines[index:index + 2]
        return lines[index]

    assert header(TOY_CONFIG).split() == ["variant", "s/iter", "samples/s", "vs", "first", "peak", "MB", "kernel", "s",
                                          "kernel", "%"]
    plugin = tmp_path / "toy"
    shutil.copytree(TOY_DIR, plugin, ignore=shutil.ignore_patterns("output_*", "__pycache__"))
    with open(plugin / "dygraph_model.py", "a", encoding="utf-8") as handle:
        handle.write('\nBENCHMARK_LABELS = {"samples": "points", "kernels": "linear"}\n'
                     'BENCHMARK_VARIANTS = [{"runner.print_interval": 7, "runner.seed": 12345, "runner.epochs": 1}]\n')
    assert header(plugin / "config.yaml").split()[2:] == ["points/s", "vs", "first", "peak", "MB", "linear", "s",
                                                           "linear", "%"]


def test_benchmark_under_a_multi_process_launcher_is_a_one_line_error():
    """The benchmark times one process: launched N times, the ranks would share the cores they time."""
    process = run_tool("benchmark.py", "-m", TOY_CONFIG, "--iterations", "1",
                       env={"PADDLE_TRAINER_ID": "1", "PADDLE_TRAINERS_NUM": "2"})
    assert_user_error(process, "tools/benchmark.py", "runs in one process", "started 2")


def test_benchmark_peer_column_times_the_plugins_peer_command_in_the_peer_folder(tmp_path):
    """--peer runs the command of benchmark_peer.json (next to the config) in the given folder and prints its time
    and our ratio."""
    plugin = tmp_path / "toy"
    shutil.copytree(TOY_DIR, plugin, ignore=shutil.ignore_patterns("output_*", "__pycache__"))
    spec = {"label": "fake", "config": "config.yaml", "seconds": r"took ([0-9.]+) s",
            "commands": [["sh", "peer.sh", "{iterations}"]]}
    (plugin / "benchmark_peer.json").write_text(json.dumps(spec))
    peer = tmp_path / "peer"
    peer.mkdir()
    (peer / "peer.sh").write_text('echo "warming up"; echo "took 0.5 s over $1 iterations"\n')
    process = run_tool("benchmark.py", "-m", plugin / "config.yaml", "--iterations", "2", "--warmup", "0",
                       "--peer", peer)
    assert_ok(process)
    lines = process.stdout.splitlines()
    header = next(line for line in lines if line.startswith("variant "))
    assert header.split()[-4:] == ["fake", "s", "vs", "peer"]
    row = lines[lines.index(header) + 1].split()
    ours, theirs, ratio = float(row[-8]), float(row[-2]), float(row[-1].rstrip("x"))  # the label may have spaces
    assert theirs == 0.5 and abs(ratio - ours / 0.5) < 0.01 + 0.01 * ours / 0.5
    assert "peer.sh 2" in process.stdout  # {iterations} became the benchmark's count
    (peer / "peer.sh").write_text("echo nothing useful\n")
    failed = run_tool("benchmark.py", "-m", plugin / "config.yaml", "--iterations", "1", "--warmup", "0",
                      "--peer", peer)
    assert_user_error(failed, "the peer command failed (exit 0) or printed no time")
    no_peer = run_tool("benchmark.py", "-m", TOY_CONFIG, "--iterations", "1", "--warmup", "0", "--peer", peer)
    assert_user_error(no_peer, "--peer given, but there is no benchmark_peer.json next to the config")
    spec["commands"].append(["sh", "peer.sh"])
    (plugin / "benchmark_peer.json").write_text(json.dumps(spec))
    too_many = run_tool("benchmark.py", "-m", plugin / "config.yaml", "--iterations", "1", "--warmup", "0",
                        "--peer", peer)
    assert_user_error(too_many, "benchmark_peer.json has 2 command(s) for 1 BENCHMARK_VARIANTS")

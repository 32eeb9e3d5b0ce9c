"""PaddleRec's runner keys mean what they mean there: runner.use_visual writes VisualDL scalars where PaddleRec
does, and every other PaddleRec key is known (it works, or warns once that it has no effect here).

The toy plugin is copied to tmp_path: VisualDL logs go next to the config, as in PaddleRec.
"""
import os
import shutil

import pytest

from tool_helpers import TOY_DIR, assert_ok, assert_user_error, run_tool
from tools.utils.config import NO_EFFECT, RUNNER_DEFAULTS, load_config
from tools.utils.config import runner_keys_markdown

# The runner.* keys read by PaddleRec's dygraph tools/trainer.py, tools/infer.py and tools/utils (and its
# static-graph trainer's use_inference, save_inference_*, thread_num, reader_type).
PADDLEREC_RUNNER_KEYS = [
    "use_gpu", "use_auc", "use_npu", "use_xpu", "use_visual", "train_data_dir", "epochs", "print_interval",
    "train_batch_size", "model_save_path", "model_init_path", "use_fleet", "seed", "test_data_dir",
    "infer_batch_size", "infer_load_path", "infer_start_epoch", "infer_end_epoch", "train_reader_path",
    "infer_reader_path", "num_workers", "user_define_reader", "use_inference", "save_inference_feed_varnames",
    "save_inference_fetch_varnames", "thread_num", "reader_type"]
SMALL = ["runner.epochs=1", "runner.print_interval=4"]


@pytest.fixture
def toy(tmp_path):
    folder = tmp_path / "toy"
    shutil.copytree(TOY_DIR, folder, ignore=shutil.ignore_patterns("output_*", "visualDL_log", "__pycache__"))
    return folder


def scalars(log_dir):
    """{tag: [(step, value)]} of the one VisualDL log file in log_dir, read by VisualDL itself."""
    from visualdl import LogReader

    files = os.listdir(log_dir)
    assert len(files) == 1, files
    reader = LogReader(file_path=os.path.join(log_dir, files[0]))
    return {tag: [(record.id, record.value) for record in reader.get_data("scalar", tag)]
            for tag in reader.get_tags().get("scalar", [])}


def test_every_paddlerec_key_is_known_and_documented():
    for name in PADDLEREC_RUNNER_KEYS:
        spec = RUNNER_DEFAULTS[f"runner.{name}"]
        assert spec.paddlerec == "same" or spec.paddlerec.startswith("extended: ") or spec.paddlerec == NO_EFFECT
    table = runner_keys_markdown()
    assert "| `runner.use_xpu` | bool |  | `False` | no effect here |" in table
    assert "| `runner.model_init_path` | str |  | `\"\"` | same |" in table


def test_keys_without_effect_warn_once_and_name_why(toy):
    overrides = ["runner.use_xpu=True", "runner.num_workers=4", "runner.reader_type=QueueDataset",
                 "runner.thread_num=8", "runner.use_inference=True", "runner.save_inference_feed_varnames=[x]",
                 "runner.user_define_reader=True", "runner.use_npu=True",
                 "runner.save_inference_fetch_varnames=[y]"]
    process = run_tool("trainer.py", "-m", toy / "config.yaml", "-o", *SMALL, *overrides, cwd=toy)
    assert_ok(process)
    warnings = [line for line in process.stderr.splitlines() if "has no effect here" in line]
    assert len(warnings) == len(overrides), process.stderr
    for item in overrides:
        key = item.split("=")[0]
        assert sum(f" - WARNING - {key} = " in line for line in warnings) == 1, (key, warnings)
    assert "num_workers = 4 has no effect here: PaddleRec's DataLoader worker processes" in process.stderr
    # Left at their PaddleRec defaults they say nothing (a second run into the same folder must replace the first).
    quiet = run_tool("trainer.py", "-m", toy / "config.yaml", "-o", *SMALL, "runner.use_xpu=False", "runner.overwrite=True",
                     cwd=toy)
    assert_ok(quiet)
    assert "has no effect" not in quiet.stderr


def test_paddlerec_keys_in_the_yaml_are_not_unknown(toy):
    config = toy / "config.yaml"
    config.write_text(config.read_text().replace("runner:\n", "runner:\n  num_workers: 2\n  use_visual: False\n"
                                                 "  reader_type: \"DataLoader\"\n"))
    loaded = load_config(str(config), ["runner.thread_num=4", "runner.use_visual=true"])
    assert (loaded["runner.num_workers"], loaded["runner.thread_num"], loaded["runner.use_visual"]) == (2, 4, True)


def test_use_visual_writes_paddlerec_visualdl_scalars(toy):
    pytest.importorskip("visualdl")
    assert_ok(run_tool("trainer.py", "-m", "config.yaml", "-o", "runner.epochs=2", "runner.use_visual=True", cwd=toy))
    train = scalars(toy / "visualDL_log" / "train")
    # 12 batches per epoch, a line every 4: steps 1, 5, 9, 13, 17, 21 (batches done, as in metrics.jsonl).
    assert {"train/loss", "train/acc"} <= set(train), sorted(train)
    assert [step for step, _ in train["train/loss"]] == [1, 5, 9, 13, 17, 21]
    assert all(0.0 <= value <= 1.0 for _, value in train["train/acc"])
    assert_ok(run_tool("infer.py", "-m", "config.yaml", "-o", "runner.use_visual=True", cwd=toy))
    infer = scalars(toy / "visualDL_log" / "infer")
    # 600 samples in batches of 100, a line every 4 batches, over 2 checkpoints: batches 0, 4, 6, 10.
    assert [step for step, _ in infer["infer/acc"]] == [0, 4, 6, 10], infer
    assert infer["infer/acc"][-1][1] > 0.8


def test_use_visual_without_visualdl_is_one_clear_error(toy, tmp_path):
    hide = tmp_path / "no_visualdl"
    hide.mkdir()
    (hide / "visualdl.py").write_text("raise ImportError(\"No module named 'visualdl'\")\n")
    process = run_tool("trainer.py", "-m", "config.yaml", "-o", *SMALL, "runner.use_visual=True", cwd=toy,
                       env={"PYTHONPATH": str(hide)})
    assert_user_error(process, "runner.use_visual", 'pip install -e ".[visual]"')
    assert not (toy / "output_model_toy").exists() and not (toy / "visualDL_log").exists()

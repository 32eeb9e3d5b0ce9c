"""PaddleRec's own tools/trainer.py and tools/infer.py run the MAML model folder unchanged.

They need a PaddleRec checkout; the project machines keep one, unchanged, beside the repository
(../shared/reference/paddlerec). The run is shrunk with PaddleRec's own -o overrides (it types a value like the
YAML value it replaces) and writes its checkpoints to a temporary folder.
"""
import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest

from tool_helpers import REPO_ROOT

PADDLEREC = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "reference", "paddlerec"))
MODEL_DIR = os.path.join(REPO_ROOT, "models", "multitask", "maml")
SMALL = ["runner.epochs=2", "runner.tasks_per_epoch=8", "runner.train_batch_size=4", "runner.print_interval=1",
         "runner.infer_tasks=8", "runner.infer_batch_size=4", "runner.infer_end_epoch=2",
         "hyper_parameters.update_step=1", "hyper_parameters.update_step_test=5", "hyper_parameters.bn_channel=16"]
# PaddleRec's epoch summary: "epoch: 0 done, acc: 0.512500,loss:0.61, epoch time: 1.00 s"
DONE = re.compile(r"epoch: (\d+) done, acc: ([0-9.naif]+),")


def run_paddlerec(tool, overrides):
    script = os.path.join(PADDLEREC, "tools", tool)
    return subprocess.run([sys.executable, "-u", script, "-m", "config.yaml", "-o", *overrides], cwd=MODEL_DIR,
                          capture_output=True, text=True, timeout=600)


def epoch_accuracies(process):
    assert process.returncode == 0, f"exit {process.returncode}\nstderr:\n{process.stderr[-3000:]}"
    # PaddleRec logs through logging (stderr).
    return {int(epoch): float(acc) for epoch, acc in DONE.findall(process.stderr + process.stdout)}


@pytest.mark.skipif(not os.path.isfile(os.path.join(PADDLEREC, "tools", "trainer.py")),
                    reason=f"no PaddleRec checkout at {PADDLEREC}")
@pytest.mark.skipif(importlib.util.find_spec("six") is None,
                    reason="PaddleRec's tools/utils/envs.py imports six, which is not installed")
def test_paddlerec_trainer_and_infer_run_the_model_folder(tmp_path):
    out = str(tmp_path / "out")
    trained = epoch_accuracies(run_paddlerec("trainer.py", SMALL + [f"runner.model_save_path={out}"]))
    assert sorted(trained) == [0, 1], trained
    assert sorted(os.listdir(out)) == ["0", "1"]
    assert sorted(os.listdir(os.path.join(out, "1"))) == ["rec.pdopt", "rec.pdparams"]
    inferred = epoch_accuracies(run_paddlerec("infer.py", SMALL + [f"runner.infer_load_path={out}"]))
    assert sorted(inferred) == [0, 1], inferred
    print(f"PaddleRec trainer acc by epoch {trained}; infer acc by epoch {inferred}")
    # Query accuracy of 5-way tasks after adaptation: a probability, and above chance (0.2) even this early.
    for acc in [*trained.values(), *inferred.values()]:
        assert math.isfinite(acc) and 0.2 < acc <= 1.0

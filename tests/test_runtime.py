"""tools/utils/environment.py: environment before paddle, seeding."""
import os
import subprocess
import sys

import pytest

from tool_helpers import REPO_ROOT
from tools.utils.environment import epoch_seed, prepare_environment


def test_tool_modules_do_not_import_paddle_at_import_time():
    # The environment must be prepared before Paddle starts, so the entry
    # points may only import paddle after loading the config.
    code = ("import sys; import tools.trainer, tools.infer, tools.plot_metrics, tools.utils.environment; "
            "print('paddle' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.filterwarnings("ignore:prepare_environment.. called after paddle")  # other tests imported it
def test_prepare_environment_sets_flags(monkeypatch):
    monkeypatch.delenv("FLAGS_cudnn_deterministic", raising=False)
    monkeypatch.setenv("MKL_DEBUG_CPU_TYPE", "4")  # a user's own choice is kept (the tools never set it)
    prepare_environment(deterministic=True)
    assert os.environ["FLAGS_cudnn_deterministic"] == "1"
    assert os.environ["MKL_DEBUG_CPU_TYPE"] == "4"


@pytest.mark.filterwarnings("ignore:prepare_environment.. called after paddle")  # other tests imported it
def test_prepare_environment_without_determinism(monkeypatch):
    monkeypatch.delenv("FLAGS_cudnn_deterministic", raising=False)
    monkeypatch.delenv("MKL_DEBUG_CPU_TYPE", raising=False)
    prepare_environment(deterministic=False)
    assert "FLAGS_cudnn_deterministic" not in os.environ
    # CPU-library tuning is the model's business: the generic tools leave MKL alone.
    assert "MKL_DEBUG_CPU_TYPE" not in os.environ


@pytest.mark.filterwarnings("ignore:No ccache found")
def test_seed_everything_repeats_all_generators():
    import random

    import numpy as np
    import paddle

    from tools.utils.environment import seed_everything

    def draw():
        return random.random(), float(np.random.rand()), float(paddle.rand([1]).item())

    seed_everything(5)
    first = draw()
    seed_everything(5)
    assert draw() == first
    seed_everything(6)
    assert draw() != first


def test_epoch_seeds_differ_per_epoch_and_from_the_seed():
    seeds = [epoch_seed(2026, epoch) for epoch in range(100)]
    assert len(set(seeds)) == 100 and 2026 not in seeds


def test_log_lines_have_paddlerec_format_and_go_through_tqdm(monkeypatch, capsys):
    import re

    from tools.utils import console

    written = []  # tqdm.write clears and redraws any active bar around the line
    real_write = console.tqdm.write
    monkeypatch.setattr(console.tqdm, "write", lambda text, file=None, **kw: (written.append(text),
                                                                               real_write(text, file=file)))
    console.log("epoch: 0 done, acc: 0.5000")
    console.warn("runner.use_xpu = True has no effect here")
    out, err = capsys.readouterr()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"  # PaddleRec: '%(asctime)s - %(levelname)s - %(message)s'
    assert re.fullmatch(stamp + r" - INFO - epoch: 0 done, acc: 0\.5000\n", out), out
    assert re.fullmatch(stamp + r" - WARNING - runner\.use_xpu = True has no effect here\n", err), err
    assert written == [out.rstrip("\n"), err.rstrip("\n")]

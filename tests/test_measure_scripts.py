"""The measurement scripts doc/performance.md quotes still run and count consistently."""
import os
import re

from tool_helpers import REPO_ROOT, assert_ok, assert_user_error, run_tool

MEASURE = os.path.join(REPO_ROOT, "doc", "measure")
SAMPLE_CONFIG = os.path.join(REPO_ROOT, "models", "multitask", "maml", "config.yaml")


def test_onednn_calls_per_kind_add_up_to_the_total():
    process = run_tool("onednn_calls.py", "-m", SAMPLE_CONFIG, "-o", "hyper_parameters.first_order=False",
                       script_path=os.path.join(MEASURE, "onednn_calls.py"))
    assert_ok(process)
    lines = process.stdout.strip().splitlines()
    total = re.match(r"meta-iteration: [\d.]+ s; inside oneDNN on the main thread: ([\d.]+) s in (\d+) calls", lines[0])
    assert total, process.stdout
    kinds = [re.match(r"\s+(.+?)\s+([\d.]+) ms\s+(\d+) calls", line) for line in lines[1:]]
    assert all(kinds), process.stdout
    assert sum(int(k.group(3)) for k in kinds) == int(total.group(2))
    assert abs(sum(float(k.group(2)) for k in kinds) / 1e3 - float(total.group(1))) < 0.01


def test_conv_efficiency_counts_the_second_order_floor():
    process = run_tool("conv_efficiency.py", script_path=os.path.join(MEASURE, "conv_efficiency.py"))
    assert_ok(process)
    # 28x28x1x64x9 + 14x14x64x64x9 + 7x7x64x64x9 + 3x3x64x64x9 multiply-adds per image forward.
    assert "forward 9.82 M, input gradients 9.36 M, weight gradients 9.82 M" in process.stdout, process.stdout
    assert "first order 92.8 G, second order 138.4 G, ratio 1.492" in process.stdout, process.stdout


def test_onednn_calls_names_a_bad_override_in_one_line():
    process = run_tool("onednn_calls.py", "-m", SAMPLE_CONFIG, "-o", "hyper_parameters.n_way=x",
                       script_path=os.path.join(MEASURE, "onednn_calls.py"))
    assert_user_error(process, "config.yaml", "hyper_parameters.n_way")

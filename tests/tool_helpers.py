"""Helpers for tests that run the tools as subprocesses, the way users do."""
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tests import tools.utils directly; plain `pytest` (unlike `python -m
# pytest`) does not put the repository root on sys.path.
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
TOOLS_DIR = os.path.join(REPO_ROOT, "tools")
TOY_DIR = os.path.join(REPO_ROOT, "tests", "toy_model")
TOY_CONFIG = os.path.join(TOY_DIR, "config.yaml")


def run_tool(script, *args, cwd=REPO_ROOT, env=None, script_path=None, unset=()):
    """Run tools/<script> with this Python (`env` added to the environment, the variables in `unset` removed);
    return the CompletedProcess."""
    command = [sys.executable, "-u", script_path or os.path.join(TOOLS_DIR, script), *map(str, args)]
    process_env = {key: value for key, value in os.environ.items() if key not in unset}
    process_env.update(env or {})
    return subprocess.run(command, cwd=cwd, env=process_env, capture_output=True, text=True, timeout=120)


def assert_ok(process):
    assert process.returncode == 0, f"exit {process.returncode}\nstdout:\n{process.stdout}\nstderr:\n{process.stderr}"


def assert_user_error(process, *expected_fragments):
    """Exit code 2, last stderr line `error: ...` naming each fragment, no traceback."""
    lines = process.stderr.strip().splitlines()
    assert process.returncode == 2, f"exit {process.returncode}\nstderr:\n{process.stderr}"
    assert lines and lines[-1].startswith("error: "), process.stderr
    assert "Traceback" not in process.stderr, process.stderr
    for fragment in expected_fragments:
        assert fragment in lines[-1], f"{fragment!r} not in {lines[-1]!r}"
    return lines[-1]

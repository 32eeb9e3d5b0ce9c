"""Shared fixtures: repo paths and, when the local mirror exists, real Omniglot splits."""
import os
import shutil
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The read-only full Omniglot of the project machines, beside the repo.
OMNIGLOT_MIRROR = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data", "omniglot"))


@pytest.fixture(scope="session")
def omniglot_mirror():
    if not os.path.isfile(os.path.join(OMNIGLOT_MIRROR, "images_background.zip")):
        pytest.skip(f"no Omniglot mirror at {OMNIGLOT_MIRROR}")
    return OMNIGLOT_MIRROR


@pytest.fixture(scope="session")
def omniglot_splits(omniglot_mirror, tmp_path_factory):
    """Real paddlerec splits prepared once per session into a temp folder.

    Removed at the end: 32,460 files per session would otherwise pile up in
    pytest's kept temp folders.
    """
    out = tmp_path_factory.mktemp("omniglot")
    env = dict(os.environ, OMNIGLOT_MIRROR=omniglot_mirror, PYTHON=sys.executable)
    proc = subprocess.run(["sh", os.path.join(REPO_ROOT, "datasets", "omniglot", "run.sh"),
                           "--out", str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    yield out, proc
    shutil.rmtree(out, ignore_errors=True)

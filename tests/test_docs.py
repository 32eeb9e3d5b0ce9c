"""doc/tools.md must show the runner.* and environment tables the tools really use."""
import os

from tool_helpers import REPO_ROOT
from tools.utils.config import runner_keys_markdown
from tools.utils.environment import environment_markdown


def test_runner_keys_table_in_doc_matches_defaults():
    with open(os.path.join(REPO_ROOT, "doc", "tools.md"), encoding="utf-8") as handle:
        doc = handle.read()
    assert runner_keys_markdown() in doc, "regenerate with: python -m tools.utils.config"


def test_environment_table_in_doc_matches_the_checks():
    with open(os.path.join(REPO_ROOT, "doc", "tools.md"), encoding="utf-8") as handle:
        doc = handle.read()
    assert environment_markdown() in doc, "regenerate with: python -m tools.utils.environment"

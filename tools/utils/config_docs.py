"""The runner.* keys table of doc/tools.md, generated from RUNNER_DEFAULTS.

    python -m tools.utils.config_docs      # prints the Markdown table

tests/test_docs.py checks that doc/tools.md contains exactly this table, so
the documentation cannot drift from the defaults the tools really use.
"""
from tools.utils.config import RUNNER_DEFAULTS


def _default_text(value) -> str:
    if value is None:
        return "(unset)"
    if value == "":
        return '`""`'
    return f"`{value}`"


def runner_keys_markdown() -> str:
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, spec in RUNNER_DEFAULTS.items():
        doc = spec.doc.replace("|", "\\|")  # a bare | would split the table cell
        lines.append(f"| `{key}` | {spec.type.__name__} | {_default_text(spec.default)} | {doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(runner_keys_markdown(), end="")

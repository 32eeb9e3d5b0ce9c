"""The runner.* keys table of doc/tools.md, generated from RUNNER_DEFAULTS, with how each
key relates to PaddleRec's tools (same / extended / no effect here).

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
    lines = ["| key | type | default | PaddleRec | meaning |", "| --- | --- | --- | --- | --- |"]
    for key, spec in RUNNER_DEFAULTS.items():
        doc = spec.doc.replace("|", "\\|")  # a bare | would split the table cell
        paddlerec = (spec.paddlerec or "not a PaddleRec key").replace("|", "\\|")
        lines.append(f"| `{key}` | {spec.type.__name__} | {_default_text(spec.default)} | {paddlerec} | {doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(runner_keys_markdown(), end="")

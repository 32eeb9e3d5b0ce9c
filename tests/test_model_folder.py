"""The shape of models/multitask/maml/: no import cycle and no upward import, the engine met through its package
only, no top-level name that an installed package could shadow, and comments that say why (no machine names, no
timings, no issue numbers: measurements live in doc/performance.md, and an issue number means nothing to a user)."""
import ast
import glob
import io
import os
import re
import subprocess
import sys
import tokenize

import pytest

from tests.conftest import REPO_ROOT
from tests.maml_modules import MODEL_DIR

ENGINE = "maml_kernels"


def _modules():
    """{module name: path} of the folder's code: its top-level files and the engine package's modules."""
    found = {os.path.splitext(os.path.basename(p))[0]: p for p in glob.glob(os.path.join(MODEL_DIR, "*.py"))}
    for path in glob.glob(os.path.join(MODEL_DIR, ENGINE, "*.py")):
        stem = os.path.splitext(os.path.basename(path))[0]
        found[ENGINE if stem == "__init__" else f"{ENGINE}.{stem}"] = path
    return found


def _imports(name, path, local):
    """The folder's modules that module `name` imports (absolute names)."""
    package = name if name == ENGINE else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(filter(None, [package.rsplit(".", node.level - 1)[0], node.module]))
            # `from . import x` imports the submodule x; the package itself is already being imported.
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in local else base)
    return {t for t in targets if t in local}


def _graph():
    local = _modules()
    return {name: _imports(name, path, local) for name, path in local.items()}


def test_the_folder_has_no_import_cycle():
    graph = _graph()
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        if state.get(name) == "open":
            cycle = trail[trail.index(name):] + [name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        state[name] = "open"
        for target in sorted(graph[name]):
            visit(target, trail + [name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])


def test_the_engine_imports_nothing_above_it_and_the_algorithm_meets_it_through_one_import():
    graph = _graph()
    for name, targets in graph.items():
        if name.startswith(ENGINE):
            upward = {t for t in targets if not t.startswith(ENGINE)}
            assert not upward, f"{name} imports the model folder above it: {sorted(upward)}"
        else:
            inner = {t for t in targets if t.startswith(ENGINE + ".")}
            assert not inner, f"{name} reaches into the engine past its package: {sorted(inner)}"
    # The cycle walk must see real edges, or it proves nothing.
    assert "maml_settings" in graph["dygraph_model"] and ENGINE in graph["net"]


def test_no_installed_module_can_shadow_the_folders_top_level_names():
    """PaddleRec's tools append the model folder to sys.path, so an installed module of the same name would be
    imported instead of the folder's own. Asked of a fresh interpreter: this process's sys.path also holds the
    copies of the model folder that other tests loaded."""
    names = sorted({name.partition(".")[0] for name in _modules()})
    probe = ("import importlib.machinery, sys\n"
             "names = sys.argv[1:]\n"
             "print(' '.join(n for n in names if n in sys.builtin_module_names\n"
             "               or importlib.machinery.PathFinder.find_spec(n, sys.path)))")
    found = subprocess.run([sys.executable, "-c", probe, *names], capture_output=True, text=True, timeout=60,
                           cwd=os.path.dirname(REPO_ROOT), check=True)
    clashes = found.stdout.split()
    assert not clashes, f"installed modules with the names of the model folder's: {clashes}"


MACHINES = re.compile(r"\b(Intel|AMD|EPYC|Xeon|Zen ?\d?|Ryzen|Opteron)\b")
ISSUE = re.compile(r"\bissues?[- ]?#?\d+", re.IGNORECASE)
TIMING = re.compile(r"\d(?:\.\d+)?\s?(?:ms|us|µs|s|sec|seconds|min|minutes|h|hours)\b|\d(?:\.\d+)?x (?:faster|slower)"
                    r"|GFLOP/s", re.IGNORECASE)


def _comments_and_docstrings(path):
    """(line, text) of every comment and docstring of a Python file."""
    source = open(path, encoding="utf-8").read()
    found = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                found.append((node.body[0].lineno, doc))
    return found


CODE = sorted(glob.glob(os.path.join(REPO_ROOT, "models", "**", "*.py"), recursive=True)
              + glob.glob(os.path.join(REPO_ROOT, "datasets", "**", "*.py"), recursive=True)
              + glob.glob(os.path.join(REPO_ROOT, "tools", "**", "*.py"), recursive=True))


TESTS = sorted(glob.glob(os.path.join(REPO_ROOT, "tests", "**", "*.py"), recursive=True))


@pytest.mark.parametrize("path", TESTS, ids=lambda p: os.path.relpath(p, REPO_ROOT))
def test_test_comments_name_no_issue_number(path):
    """Tests may time things (timeouts), and fake a CPU's name in their data, but name no issue either."""
    bad = [f"{os.path.relpath(path, REPO_ROOT)}:{line}: {match.group(0)!r}"
           for line, text in _comments_and_docstrings(path) for match in ISSUE.finditer(text)]
    assert not bad, "say what the test guards, not which issue asked for it:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", CODE, ids=lambda p: os.path.relpath(p, REPO_ROOT))
def test_comments_name_no_machine_timing_or_issue_number(path):
    bad = [f"{os.path.relpath(path, REPO_ROOT)}:{line}: {match.group(0)!r}"
           for line, text in _comments_and_docstrings(path)
           for pattern in (MACHINES, ISSUE, TIMING) for match in pattern.finditer(text)]
    assert not bad, "move measurements to doc/performance.md, say why in the comment:\n" + "\n".join(bad)


DOCS = sorted(glob.glob(os.path.join(REPO_ROOT, "*.md")) + glob.glob(os.path.join(REPO_ROOT, "doc", "*.md"))
              + glob.glob(os.path.join(REPO_ROOT, "models", "**", "*.md"), recursive=True)
              + glob.glob(os.path.join(REPO_ROOT, "datasets", "**", "*.md"), recursive=True)
              + glob.glob(os.path.join(REPO_ROOT, "models", "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, REPO_ROOT))
def test_docs_and_configs_name_no_issue_number(path):
    text = open(path, encoding="utf-8").read()
    bad = [f"{os.path.relpath(path, REPO_ROOT)}: {m.group(0)!r}" for m in ISSUE.finditer(text)]
    assert not bad, "say what changed for a user, not which issue asked for it:\n" + "\n".join(bad)


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """The patterns above must catch the kinds of notes they are meant to keep out."""
    sample = tmp_path / "sample.py"
    sample.write_text('"""Measured on an AMD EPYC: 1.18 -> 0.43 s (issue 14)."""\nx = 1  # 3.6 -> 5.4 ms, 2x faster\n')
    texts = " ".join(text for _, text in _comments_and_docstrings(str(sample)))
    assert MACHINES.search(texts) and ISSUE.search(texts)
    assert TIMING.findall(texts) == ["5.4 ms", "2x faster", "0.43 s"]

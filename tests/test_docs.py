"""The API reference (docs/api, Sphinx + napoleon over the numpydoc docstrings) builds
with warnings as errors, and names every public object of both packages."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import nnbridge
import trajopt

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_builds_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    out = tmp_path / "html"
    p = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b",
                        "html", "-d", str(tmp_path / "doctrees"), str(ROOT / "docs" / "api"),
                        str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    pages = (out / "trajopt.html").read_text() + (out / "nnbridge.html").read_text()
    ids = set(re.findall(r'id="((?:trajopt|nnbridge)[\w.]*)"', pages))
    # a public submodule (trajopt.compat) is there when its page section is
    ids |= {i.removeprefix("module-") for i in re.findall(
        r'id="(module-(?:trajopt|nnbridge)[\w.]*)"', pages)}
    for pkg in (trajopt, nnbridge):
        missing = [name for name in pkg.__all__ if name != "errors"
                   and not any(i.startswith(pkg.__name__) and i.endswith(f".{name}")
                               for i in ids)]
        assert not missing, f"{pkg.__name__}: not in the API reference: {missing}"


def test_no_docstring_holds_a_control_character():
    """A backslash in a docstring that is not a raw string turns ``\\top`` into a tab and
    ``\\beta`` into a backspace (the math is then wrong in help() and the API reference):
    every docstring of both packages is free of them."""
    import ast
    found = []
    paths = sorted((ROOT / "trajopt").rglob("*.py")) + sorted((ROOT / "nnbridge").rglob("*.py"))
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc and any(c in doc for c in "\t\b\f\v\a"):
                    found.append(f"{path.relative_to(ROOT)}:{getattr(node, 'name', '')}")
    assert not found, found


def _python_blocks():
    """Every fenced ``python`` block of the README and docs/*.md: (label, source)."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for path in files:
        text = path.read_text()
        for m in re.finditer(r"```python\n(.*?)```", text, re.S):
            line = text[:m.start()].count("\n") + 1
            yield f"{path.relative_to(ROOT)}:{line}", m.group(1)


def _free_names(source: str) -> set[str]:
    """Names a block reads that it never binds (and that are not builtins): a block with
    any is a fragment of a longer program (``model``, ``loader`` defined elsewhere)."""
    import ast
    import builtins
    tree = ast.parse(source)
    bound, loaded = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return loaded - bound


def test_free_names_tell_a_fragment_from_a_program():
    assert _free_names("import torch\nx = torch.ones(2)\nprint(x)") == set()
    assert _free_names("def f(a):\n    return a + b\n") == {"b"}
    assert _free_names("opt = nnbridge.DDPNOpt(model)") == {"nnbridge", "model"}


_PROGRAMS = [(label, src) for label, src in _python_blocks() if not _free_names(src)]


def test_the_docs_hold_complete_programs():
    """The README's two examples and the GT-DDP / ODE pages' are complete programs (what
    the next test runs); a fragment beside them reads names defined elsewhere."""
    labels = [label for label, _ in _PROGRAMS]
    assert sum(label.startswith("README.md") for label in labels) >= 2, labels
    assert len(labels) >= 4, labels


@pytest.mark.parametrize("label,source", _PROGRAMS, ids=[lb for lb, _ in _PROGRAMS])
def test_docs_program_runs(label, source, tmp_path):
    """Each complete program in the docs runs as written, in a fresh interpreter, with
    warnings of the libraries as errors (a user copies these first)."""
    script = tmp_path / "block.py"
    script.write_text(source)
    p = subprocess.run([sys.executable, "-W", "error::UserWarning", "-W",
                        "error::DeprecationWarning:trajopt", "-W",
                        "error::DeprecationWarning:nnbridge", str(script)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, f"{label}:\n{p.stderr[-3000:]}"

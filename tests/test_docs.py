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

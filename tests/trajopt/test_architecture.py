"""The layering DESIGN.md promises, read off the source: no import circle inside
``trajopt`` (function-level imports included), ``trajopt`` never imports ``nnbridge``, the
kernel package imports no solver, and no module grows past the size limit."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "trajopt"
MAX_LINES = 450


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every trajopt/nnbridge module ``path`` imports, anywhere in the file."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)
    return {m for m in out if m.split(".")[0] in ("trajopt", "nnbridge")}


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        # "from .x import name" names a module or an attribute: keep the modules
        graph[mod] = {m for m in _imports(path) if m in files and m != mod}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle among modules, ignoring edges into a package's own ``__init__`` from
    inside the package (Python resolves those before the submodule runs)."""
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(u):
        color[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if u.startswith(v + "."):
                continue  # a submodule importing its parent package
            if color.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if color.get(v) is None:
                found = visit(v)
                if found:
                    return found
        stack.pop()
        color[u] = 2
        return None

    for u in sorted(graph):
        if color.get(u) is None:
            found = visit(u)
            if found:
                return found
    return None


def test_no_import_circle_inside_trajopt():
    graph = _graph()
    assert "trajopt.ddp.api" in graph and graph["trajopt.ddp.api"]  # the parser works
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"


def test_cycle_detection_can_fail():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_trajopt_never_imports_nnbridge_and_the_kernel_imports_no_solver():
    for path in ROOT.rglob("*.py"):
        deps = _imports(path)
        assert not any(d.startswith("nnbridge") for d in deps), path
        if _module(path).startswith("trajopt.riccati"):
            bad = [d for d in deps if d.startswith(("trajopt.lqr", "trajopt.ddp",
                                                    "trajopt.dare", "trajopt.steepest"))]
            assert not bad, f"{path} imports {bad}"


def test_no_module_over_the_size_limit():
    sizes = {str(p.relative_to(ROOT.parent)): len(p.read_text().splitlines())
             for p in ROOT.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > MAX_LINES} == {}

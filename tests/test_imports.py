"""The modules' imports flow one way (DESIGN §10): no cycle, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu

PACKAGE = Path(__file__).resolve().parents[1] / "entropy_lab"


def import_graph(package: Path) -> dict[str, set[str]]:
    """module → the package's modules it imports, at module level or inside a function."""
    modules = {p.stem for p in package.glob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module in modules:
        tree = ast.parse((package / f"{module}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package.name):
                tail = node.module.split(".")[1:]
                names = tail[:1] if tail else [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [
                    a.name.split(".")[1]
                    for a in node.names
                    if a.name.startswith(f"{package.name}.")
                ]
            graph[module] |= {n for n in names if n in modules and n != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            component.append(v)
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(import_graph(PACKAGE)) == []


def test_a_planted_cycle_is_found(tmp_path):
    package = tmp_path / "entropy_lab"
    package.mkdir()
    (package / "a.py").write_text("from entropy_lab.b import x\n")
    (package / "b.py").write_text("def f():\n    from entropy_lab import a\n")  # lazy
    (package / "c.py").write_text("from entropy_lab.a import y\n")
    assert cycles(import_graph(package)) == [["a", "b"]]

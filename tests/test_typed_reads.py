"""The pytest plugin reads the analysis as the typed Analysis and the records as PointRecords
(issue 21): a string-keyed read (``d["key"]``, ``d.get("key")``) is left only where a file or
a process boundary is read, in the functions named here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu

PLUGIN = Path(__file__).resolve().parents[1] / "entropy_lab" / "pytest_plugin.py"
# xdist's worker input and output, the environment, and the JSON report's copy of
# analysis.json's blocks (its serialiser).
BOUNDARIES = {"pytest_configure", "_pin_worker_gpu", "pytest_testnodedown", "_report_blocks"}


def string_reads(source: str) -> list[tuple[str, str]]:
    """(enclosing function, key) of every ``x["key"]`` load and ``x.get("key")`` call."""
    found: list[tuple[str, str]] = []

    def key_of(node: ast.AST) -> str | None:
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            key = node.slice
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            key = node.args[0] if node.func.attr == "get" and node.args else None
        else:
            return None
        return key.value if isinstance(key, ast.Constant) and isinstance(key.value, str) else None

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = function
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = child.name
            key = key_of(child)
            if key is not None:
                found.append((inner, key))
            visit(child, inner)

    visit(ast.parse(source), "<module>")
    return found


def test_the_plugin_reads_the_analysis_typed():
    reads = string_reads(PLUGIN.read_text(encoding="utf-8"))
    assert [r for r in reads if r[0] not in BOUNDARIES] == []
    assert len(reads) == 5  # the boundaries' own (counted: a new one is looked at)


def test_a_string_read_of_the_analysis_is_found():
    planted = (
        "def test_linear_window_covers_grid(self, store):\n"
        "    out = store.analysis().to_dict()\n"
        "    return out['summary'].get('verdict'), out[name]\n"
    )
    assert string_reads(planted) == [
        ("test_linear_window_covers_grid", "verdict"),
        ("test_linear_window_covers_grid", "summary"),
    ]

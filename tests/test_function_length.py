"""No function of the analysis, its statistics or its report over 80 lines (issue 21)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu

PACKAGE = Path(__file__).resolve().parents[1] / "entropy_lab"
MODULES = ("analysis.py", "stats.py", "report.py", "records.py")
MAX_LINES = 80


def function_lengths(source: str) -> dict[str, int]:
    """Qualified name → lines from ``def`` to its last line, for every function and method
    (nested ones too: a long inner function is as long to read)."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lengths[name] = child.end_lineno - child.lineno + 1  # type: ignore[operator]
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return lengths


def too_long(source: str, limit: int = MAX_LINES) -> dict[str, int]:
    return {name: n for name, n in function_lengths(source).items() if n > limit}


def test_the_counter_flags_a_planted_long_function():
    body = "".join(f"        x{i} = {i}\n" for i in range(80))
    planted = f"def short():\n    return 1\n\n\nclass C:\n    def long(self):\n{body}"
    assert function_lengths(planted) == {"short": 2, "C.long": 81}
    assert too_long(planted) == {"C.long": 81}
    assert too_long(planted.replace("        x79 = 79\n", "")) == {}  # 80 lines: allowed


@pytest.mark.parametrize("module", MODULES)
def test_no_function_over_80_lines(module):
    assert too_long((PACKAGE / module).read_text(encoding="utf-8")) == {}

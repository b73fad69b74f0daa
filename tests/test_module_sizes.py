"""The size aims of the thin-face refactor (issue 21, item 9): no file over 450 lines in rigl_fast/, no function
over 60, and every module's first line says what it owns (a docstring)."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "rigl_fast"
FILES = sorted(ROOT.rglob("*.py"))


def test_the_package_is_found():
    assert len(FILES) > 30 and (ROOT / "scheduler.py") in FILES


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_size_functions_and_first_line(path):
    src = path.read_text()
    lines = len(src.splitlines())
    assert lines <= 450, f"{path.name}: {lines} lines (at most 450)"
    tree = ast.parse(src)
    if src.strip():
        doc = ast.get_docstring(tree)
        assert doc and doc.splitlines()[0].strip(), f"{path.name}: no docstring saying what the module owns"
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert not long, f"{path.name}: functions over 60 lines: {long}"

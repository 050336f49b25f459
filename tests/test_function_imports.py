"""Function-local imports are kept only for heavy optional libraries (torch, mlflow, ray...) or modules that load
them, each with a one-line reason as a comment on its line; everything else is imported at the module top
(issue 21). The standard library is never imported inside a function."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("dags", "operators", "ray_jobs", "pipelines")


def source_files() -> list[Path]:
    return [path for layer in LAYERS for path in sorted((REPO_ROOT / layer).rglob("*.py"))]


def function_imports(path: Path) -> list[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement inside a function of the file, with its source text (all of its lines)."""
    source = path.read_text()
    lines = source.splitlines()
    found: dict[int, ast.Import | ast.ImportFrom] = {}
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom):
                    found[id(inner)] = inner
    return [(node, "\n".join(lines[node.lineno - 1 : node.end_lineno]))
            for node in sorted(found.values(), key=lambda n: n.lineno)]


def imported_roots(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name.partition(".")[0] for alias in node.names]
    return [] if node.level else [(node.module or "").partition(".")[0]]


def has_reason(text: str) -> bool:
    """A `#` comment on the statement's line (ruff wraps a long one in parentheses: then on any of its lines)."""
    return "#" in text


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO_ROOT).as_posix()}:{node.lineno}"


def test_function_local_imports_carry_a_reason():
    missing = [where(path, node) for path in source_files() for node, text in function_imports(path)
               if not has_reason(text)]
    assert not missing, "function-local imports without a `# reason` comment on their line:\n" + "\n".join(missing)


def test_no_function_local_imports_of_the_standard_library():
    stdlib = [f"{where(path, node)} ({root})" for path in source_files() for node, _ in function_imports(path)
              for root in imported_roots(node) if root in sys.stdlib_module_names]
    assert not stdlib, "standard-library imports inside functions (move them to the module top):\n" + "\n".join(stdlib)


def test_the_checker_sees_every_function_local_import(tmp_path):
    path = tmp_path / "example.py"
    path.write_text(
        "import json\n"
        "\n"
        "def f():\n"
        "    import os\n"
        "    from pipelines import registry  # heavy: loads mlflow\n"
        "    if registry:\n"
        "        from json import (  # a reason on the wrapped statement's first line\n"
        "            dumps,\n"
        "        )\n"
        "\n"
        "class C:\n"
        "    async def m(self):\n"
        "        import re\n"
        "        from . import sibling\n"
    )
    found = function_imports(path)
    assert [node.lineno for node, _ in found] == [4, 5, 7, 13, 14]  # not the module-level `import json`
    assert [has_reason(text) for _, text in found] == [False, True, True, False, False]
    assert [imported_roots(node) for node, _ in found] == [["os"], ["pipelines"], ["json"], ["re"], []]

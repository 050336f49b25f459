"""The package's import graph, read from the source (module-level and function-level imports alike): no cycles,
and imports point one way, dags -> operators -> ray_jobs -> pipelines (ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# A layer may import its own and the layers after it, never one before it.
LAYERS = ("dags", "operators", "ray_jobs", "pipelines")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for layer in LAYERS for p in sorted((REPO_ROOT / layer).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import statement of the file."""
    tree = ast.parse(path.read_text(), str(path))
    local = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            local.update(id(n) for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the submodule `pkg.sub` when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` also imports a and a.b: count the module
                target = target.rpartition(".")[0]
            if target:
                found.append((target, node.lineno, id(node) in local))
    return found


def graph() -> dict[str, dict[str, tuple[int, bool]]]:
    modules = project_modules()
    edges: dict[str, dict[str, tuple[int, bool]]] = {}
    for name, path in modules.items():
        edges[name] = {}
        for target, line, in_function in imports_of(path, modules):
            if target != name and not name.startswith(target + "."):  # a package's own __init__ is not a cycle
                edges[name].setdefault(target, (line, in_function))
    return edges


def cycles(edges: dict[str, dict]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each a cycle or knot of cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_parser_sees_module_and_function_level_imports():
    edges = graph()
    assert "pipelines.runner" in edges["ray_jobs.entry"]  # module level
    assert edges["pipelines.relevance.pipeline"]["pipelines.relevance.sft"][1]  # inside a body: still an edge
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]


def test_there_is_no_import_cycle():
    edges = graph()
    knots = cycles(edges)
    described = []
    for knot in knots:
        links = [f"{a} -> {b} (line {edges[a][b][0]}{', in a function' if edges[a][b][1] else ''})"
                 for a in knot for b in knot if b in edges[a]]
        described.append("; ".join(links))
    assert not knots, "import cycles:\n" + "\n".join(described)


def test_imports_point_from_dags_to_operators_to_ray_jobs_to_pipelines():
    edges = graph()
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    backwards = [f"{a} -> {b} (line {line})" for a, targets in edges.items() for b, (line, _) in targets.items()
                 if rank[b.split(".")[0]] < rank[a.split(".")[0]]]
    assert not backwards, "imports against the layer order (dags -> operators -> ray_jobs -> pipelines):\n" + \
        "\n".join(backwards)

"""The code version of a stage: which source its outputs depend on, recorded in the manifest as `code`.

A stage's outputs are reused only when its config, inputs *and code* match its manifest (`pipelines.stage`). The
git commit is the wrong key for the code: any commit anywhere would invalidate every stage of every run, and an
installed package has no git. So a stage's code is what its body can reach, found by reading the source (no
import, no git):

- It starts at the top-level function that defines the stage body: `rationales` in
  pipelines/relevance/pipeline.py for `rationales.<locals>.body`, `run_prepare` for prepare's body.
- A reached top-level definition (function, class, assigned constant) reaches every name it mentions: another
  definition of its module, or what it imports from the `pipelines` package, at module level or inside the
  function (`runs.log_summary` reaches that function of `runs`; a bare module name, all of the module).
- A string constant of a reached definition that names a data file beside its module (`"rules.yaml"`) reaches
  that file's bytes.

The manifest records one digest per source file over the syntax trees of the definitions reached in it, without
docstrings: a comment, docstring or formatting change redoes nothing, and editing `run_dpo` redoes dpo but not
sft, although their stage functions share a file. A definition used by many stages (the config loader, which
names every stage's config class) redoes all of them when it changes; that errs on the side of redoing.

Deliberately not followed:
- `pipelines.stage` and this module: the runner publishes what a body wrote and decides reuse; it computes no
  output, and an edit to it (a lock, a log line) must not redo every stage of every run.
- Third-party packages: their versions are in the manifest's `packages`, as information, like `git_commit`.
- What static reading cannot see: a module imported by a computed name, or code reached only through an object
  (a method of a class the stage never names, say an unpickled one). The pipelines import by name, so a stage
  that does otherwise should name what it runs.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

CODE_PACKAGES = ("pipelines",)
# The runner, not the stage: see the module docstring.
NOT_STAGE_CODE = frozenset({"pipelines.stage", "pipelines.stage_code"})

Reference = tuple[str, str | None]  # (module, top-level name); None: the whole module


@dataclasses.dataclass
class _Module:
    name: str
    key: str  # how the manifest names its file: pipelines/relevance/sft.py
    folder: Path
    definitions: dict[str, list[ast.stmt]]
    imports: dict[str, Reference]  # a top-level name bound by an import -> what it refers to


def stage_code(body: Callable, packages: tuple[str, ...] = CODE_PACKAGES) -> dict[str, str]:
    """{file: digest of the definitions of that file the stage `body` reaches}; {} if its source is unknown."""
    while isinstance(body, functools.partial):
        body = body.func
    body = inspect.unwrap(body)
    try:
        source_file = Path(inspect.getsourcefile(body) or "")
    except TypeError:  # a builtin or a C callable: nothing to read
        return {}
    qualname = getattr(body, "__qualname__", "")
    module_name = getattr(body, "__module__", None)
    if not module_name or not qualname or not source_file.is_file():
        return {}
    reader = _Reader(packages)
    reader.add_entry(module_name, source_file)
    return reader.reach((module_name, qualname.split(".")[0]))


def code_of(module_name: str, name: str, packages: tuple[str, ...] = CODE_PACKAGES) -> dict[str, str]:
    """The code a top-level definition of a module of `packages` reaches: `code_of("pipelines.relevance.pipeline",
    "sft")` is the sft stage's."""
    return _Reader(packages).reach((module_name, name))


def code_digest(code: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(code, sort_keys=True).encode()).hexdigest()


def changed_files(recorded: dict[str, str] | None, current: dict[str, str]) -> list[str]:
    """The files whose reached code differs (added, removed or changed); every current file if none recorded."""
    if recorded is None:
        return sorted(current)
    return sorted(k for k in recorded.keys() | current.keys() if recorded.get(k) != current.get(k))


class _Reader:
    def __init__(self, packages: tuple[str, ...]) -> None:
        self.packages = packages
        self.entries: dict[str, Path] = {}  # the body's own module, which may lie outside the packages

    def add_entry(self, module_name: str, path: Path) -> None:
        if not self._in_scope(module_name):
            self.entries[module_name] = path

    def reach(self, start: Reference) -> dict[str, str]:
        reached: dict[str, dict[str, list[ast.stmt]]] = defaultdict(dict)  # module -> name -> definitions
        data_files: dict[str, Path] = {}
        keys: dict[str, str] = {}
        queue = [start]
        while queue:
            module_name, name = queue.pop()
            module = self.module(module_name)
            if module is None:
                continue
            if name is None:
                names = list(module.definitions)
            elif name in module.definitions:
                names = [name]
            elif name in module.imports:  # a re-export
                queue.append(module.imports[name])
                continue
            elif self.module(f"{module_name}.{name}") is not None:  # `from pipelines.tracking import runs`
                queue.append((f"{module_name}.{name}", None))
                continue
            else:
                continue
            keys[module_name] = module.key
            for definition in names:
                if definition in reached[module_name]:
                    continue
                nodes = module.definitions[definition]
                reached[module_name][definition] = nodes
                queue.extend(self._references(module, nodes))
                data_files.update(_data_files(module, nodes))
        code = {keys[m]: _definitions_digest(defs) for m, defs in reached.items() if defs}
        code.update({key: _file_digest(path) for key, path in data_files.items()})
        return dict(sorted(code.items()))

    def module(self, name: str) -> _Module | None:
        path = self.entries.get(name) or self._module_file(name)
        if path is None:
            return None
        is_package = path.name == "__init__.py"
        if name in self.entries:
            key = path.name if name == "__main__" else name.replace(".", "/") + ".py"
        else:
            key = name.replace(".", "/") + ("/__init__.py" if is_package else ".py")
        stat = path.stat()
        return _parse(name, key, str(path), is_package, stat.st_mtime_ns, stat.st_size)

    def _in_scope(self, name: str) -> bool:
        return name not in NOT_STAGE_CODE and any(name == p or name.startswith(p + ".") for p in self.packages)

    def _module_file(self, name: str) -> Path | None:
        if not self._in_scope(name):
            return None
        top, *rest = name.split(".")
        folder = _package_folder(top)
        if folder is None:
            return None
        for candidate in (folder.joinpath(*rest).with_suffix(".py") if rest else None,
                          folder.joinpath(*rest, "__init__.py")):
            if candidate is not None and candidate.is_file():
                return candidate
        return None

    def _references(self, module: _Module, nodes: list[ast.stmt]) -> Iterator[Reference]:
        for node in nodes:
            attribute_roots = set()
            for sub in ast.walk(node):
                if (isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name)
                        and sub.value.id in module.imports and module.imports[sub.value.id][1] is None):
                    attribute_roots.add(id(sub.value))  # `runs.log_summary`: only that function of `runs`
                    yield module.imports[sub.value.id][0], sub.attr
            for sub in ast.walk(node):
                if isinstance(sub, ast.Name) and id(sub) not in attribute_roots:
                    if sub.id in module.definitions:
                        yield module.name, sub.id
                    elif sub.id in module.imports:
                        yield module.imports[sub.id]
                elif isinstance(sub, ast.Import | ast.ImportFrom):  # an import inside a function
                    yield from _import_bindings(sub, module.name, module.key.endswith("__init__.py")).values()


@functools.cache
def _package_folder(top: str) -> Path | None:
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=512)  # keyed by mtime and size too: an edited file is read again
def _parse(name: str, key: str, path: str, is_package: bool, mtime_ns: int, size: int) -> _Module:
    tree = ast.parse(Path(path).read_bytes(), filename=path)
    _drop_docstrings(tree)
    definitions: dict[str, list[ast.stmt]] = defaultdict(list)
    imports: dict[str, Reference] = {}

    def scan(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                definitions[node.name].append(node)
            elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for sub in ast.walk(target):
                        if isinstance(sub, ast.Name):
                            definitions[sub.id].append(node)
            elif isinstance(node, ast.Import | ast.ImportFrom):
                imports.update(_import_bindings(node, name, is_package))
            else:  # `if TYPE_CHECKING:`, `try: import x`: their definitions and imports are top-level too
                for field in ("body", "orelse", "finalbody"):
                    scan(getattr(node, field, None) or [])
                for handler in getattr(node, "handlers", None) or []:
                    scan(handler.body)

    scan(tree.body)
    return _Module(name=name, key=key, folder=Path(path).parent, definitions=dict(definitions), imports=imports)


def _import_bindings(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> dict[str, Reference]:
    """Name bound -> what it refers to. A submodule imported by name is resolved later, as a module."""
    if isinstance(node, ast.Import):
        return {(alias.asname or alias.name.split(".")[0]): (alias.name, None) for alias in node.names}
    base = node.module or ""
    if node.level:  # relative: from its package, one level up per extra dot
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    return {(alias.asname or alias.name): (base, None if alias.name == "*" else alias.name) for alias in node.names}


def _drop_docstrings(tree: ast.Module) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]


def _data_files(module: _Module, nodes: list[ast.stmt]) -> dict[str, Path]:
    found = {}
    for node in nodes:
        for sub in ast.walk(node):
            if (isinstance(sub, ast.Constant) and isinstance(sub.value, str) and 0 < len(sub.value) < 200
                    and "\n" not in sub.value and "\0" not in sub.value and not sub.value.startswith("/")
                    and not sub.value.endswith(".py")):
                candidate = module.folder / sub.value
                if candidate.is_file():
                    folder_key = module.key.rpartition("/")[0]
                    found[f"{folder_key}/{sub.value}" if folder_key else sub.value] = candidate
    return found


def _definitions_digest(definitions: dict[str, list[ast.stmt]]) -> str:
    h = hashlib.sha256()
    for name in sorted(definitions):
        h.update(name.encode())
        for node in definitions[name]:
            h.update(ast.dump(node, include_attributes=False).encode())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()

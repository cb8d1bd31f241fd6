"""The project's import graph, read from the source: every import, at module level or inside a
function (this codebase imports lazily a lot), between the project's packages."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("medsam3", "pipelines", "preprocessing", "serve")


def module_file(name: str) -> Path | None:
    """The file of a project module (``medsam3.io`` → ``medsam3/io/__init__.py``), None for others."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*parts)
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def module_name(path: Path) -> str:
    parts = path.resolve().relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING"


def runtime_nodes(tree: ast.AST, functions: bool = True) -> Iterator[ast.AST]:
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (annotations only, never
    run); ``functions=False``: nor those in function bodies (what importing the module runs)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if not functions and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        for child in ast.iter_child_nodes(node):
            if _type_checking(node) and child in node.body:
                continue
            todo.append(child)


def imported_names(nodes: Iterable[ast.AST], path: Path) -> set[str]:
    """The modules the import statements among ``nodes`` (of the file ``path``) import, each named
    as precisely as the import allows: ``from a import b`` names ``a.b`` when b is a submodule,
    else ``a``."""
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                package = module_name(path).split(".")[: None if path.name == "__init__.py" else -1]
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names.update(f"{base}.{a.name}" if module_file(f"{base}.{a.name}") else base for a in node.names)
    return names


def imported_modules(path: Path) -> set[str]:
    """The modules ``path`` imports anywhere in it: module level, in functions, in classes."""
    return imported_names(runtime_nodes(ast.parse(path.read_text(), str(path))), path)


def project_modules(names: Iterable[str], parents: bool = False) -> set[str]:
    """The project modules among ``names``. ``parents``: also the packages whose ``__init__``
    importing each runs first (``medsam3.io.case`` runs ``medsam3/io/__init__.py``)."""
    found: set[str] = set()
    for name in names:
        parts = name.split(".")
        found.update(".".join(parts[:i]) for i in range(1 if parents else len(parts), len(parts) + 1))
    return {name for name in found if module_file(name) is not None}


def project_imports(path: Path, parents: bool = False) -> set[str]:
    """The project modules ``path`` imports (``parents``: see :func:`project_modules`)."""
    return project_modules(imported_modules(path), parents)


def closure(roots: Iterable[str]) -> set[str]:
    """``roots`` and every project module they import, directly or not, with the packages whose
    ``__init__`` each import runs."""
    seen: set[str] = set()
    todo = list(project_modules(roots, parents=True))
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(project_imports(module_file(name), parents=True) - seen)
    return seen


def import_graph(packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module → the modules of ``packages`` it imports."""
    modules = {module_name(p) for package in packages for p in (REPO / package).rglob("*.py")}
    return {m: {i for i in project_imports(module_file(m)) if i in modules} for m in sorted(modules)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as its path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_lazy_and_submodule_imports_and_skips_type_checking_ones(tmp_path):
    graph = import_graph()
    # medsam3/cli.py imports each stage's module inside main()
    assert {"medsam3.phantom", "pipelines.train", "serve.run"} <= graph["medsam3.cli"]
    # `from medsam3.io import storage` is an import of medsam3/io/storage.py
    assert "medsam3.io.storage" in graph["pipelines.export"]
    assert project_imports(module_file("medsam3.io.read"), parents=True) >= {"medsam3", "medsam3.io", "medsam3.io.case"}
    source = tmp_path / "annotated.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from medsam3 import model\n"
                      "else:\n    from medsam3 import video\n")
    assert imported_modules(source) == {"typing", "medsam3.video"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_project_has_no_import_cycles():
    """Each dependency between two modules of medsam3/, pipelines/, preprocessing/ and serve/ goes
    one way, lazy imports included."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)

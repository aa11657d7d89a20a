"""The project's packages import each other without circles, and the method packages keep no
hand-written import list (their modules are found by a package scan).

The graph is static: every ``import`` / ``from ... import`` of a project module anywhere in a
file (module level, inside functions, under ``TYPE_CHECKING``) is an edge, so a circle hidden
behind a function-level import counts too. ``importlib.import_module`` of a computed name (the
registry's package scan) is not an edge: it names no module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("suite", "methods", "baselines")


def modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` of ``packages`` under ``root``."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _owner(name: str, known: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to (its longest known prefix), or None."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    known = modules(root, packages)
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x / from ..a import b
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                # `from pkg import sub` imports the submodule when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                           for a in node.names]
            for t in targets:
                owner = _owner(t, known)
                if owner is not None and owner != mod:
                    graph[mod].add(owner)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import circle per strongly connected component of more than one module, as a
    path ``a -> b -> ... -> a`` (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.add(m)
                    if m == node:
                        break
                if len(component) > 1:
                    found.append(_path_in(component, graph))
    return found


def _path_in(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest circle through the component's first module (breadth-first)."""
    first = min(component)
    parents: dict[str, str] = {}
    frontier = [first]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == first:  # back at the start: walk the parents home
                    path = [node]
                    while path[-1] != first:
                        path.append(parents[path[-1]])
                    return [*reversed(path), first]
                if child not in parents:
                    parents[child] = node
                    nxt.append(child)
        frontier = nxt
    return sorted(component)


def test_suite_methods_and_baselines_have_no_import_circle() -> None:
    graph = import_graph(ROOT)
    assert "suite.interface" in graph and "methods.decoupleq" in graph  # the scan saw them
    found = cycles(graph)
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


@pytest.mark.parametrize(("files", "circle"), [
    ({"a/__init__.py": "", "a/x.py": "from a.y import f\n",
      "a/y.py": "def f():\n    from a import x\n"}, ["a.x", "a.y", "a.x"]),
    ({"a/__init__.py": "from a import x  # noqa\n", "a/x.py": "import a\n"},
     ["a", "a.x", "a"]),
    ({"a/__init__.py": "", "a/x.py": "from .y import g\n", "a/y.py": "from . import z\n",
      "a/z.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from a.x import h\n"},
     ["a.x", "a.y", "a.z", "a.x"]),
])
def test_the_check_finds_function_level_package_and_relative_circles(tmp_path: Path, files,
                                                                     circle) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cycles(import_graph(tmp_path, ("a",))) == [circle]


def test_no_circle_without_a_back_edge(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "__init__.py").write_text("")
    (tmp_path / "a" / "x.py").write_text("from a import y\nimport importlib\n"
                                         "importlib.import_module('a.x')\n")
    (tmp_path / "a" / "y.py").write_text("import os\n")
    assert cycles(import_graph(tmp_path, ("a",))) == []


@pytest.mark.parametrize("package", ["methods", "baselines"])
def test_method_packages_keep_no_import_list(package: str) -> None:
    """A new file in methods/ or baselines/ needs no edit of the package's __init__."""
    tree = ast.parse((ROOT / package / "__init__.py").read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert not imports, f"{package}/__init__.py imports modules by name"


def test_every_module_of_the_method_packages_is_scanned() -> None:
    from suite.interface import builtin_modules

    files = {f"{pkg}.{p.stem}" for pkg in ("methods", "baselines")
             for p in (ROOT / pkg).glob("*.py") if not p.name.startswith("_")}
    assert set(builtin_modules()) == files

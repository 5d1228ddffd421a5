"""The house plan holds: imports point down the floors of `scaling.FLOORS`, and never round.

The imports are read from the source with `ast`, at module level and inside functions alike,
so an import tucked into a function to dodge a circle counts like any other. An import names
the module it reaches: `from scaling.data import tokenizer` reaches `scaling.data.tokenizer`,
`from scaling.data import load_dataset` reaches the package `scaling.data` itself. The floors
come from the package's own table, not from a list of allowed pairs here, so a new import
needs no edit to this file unless it breaks the plan.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

import scaling

PACKAGE = "scaling"


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module under `root` (the package's folder) by dotted name."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = (package, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _reached(name: str, modules: dict[str, Path]) -> str | None:
    """The module an import of `name` reaches: itself, else the nearest package above it."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """For each module of the package, the modules of the package it imports anywhere."""
    modules = module_names(root, package)
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(_reached(alias.name, modules) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package upwards
                    anchor = name.split(".")[:len(name.split(".")) - (not is_package)]
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    targets.add(_reached(f"{base}.{alias.name}", modules))
        graph[name] = {t for t in targets if t and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def unit(module: str) -> str | None:
    """The top-level package or module of `scaling` a module belongs to (None: the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_imports(graph: dict[str, set[str]], floors: dict[str, int]) -> list[str]:
    """Each import from a lower floor to a higher one, as 'a (floor) -> b (floor)'."""
    found = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            low, high = unit(source), unit(target)
            if None in (low, high) or floors[low] >= floors[high]:
                continue
            found.append(f"{source} (floor {floors[low]}) -> {target} (floor {floors[high]})")
    return found


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The imports between top-level packages, so two packages of one floor cannot lean on
    each other either."""
    packages = {}
    for source, targets in graph.items():
        packages.setdefault(unit(source), set()).update(
            unit(t) for t in targets if unit(t) != unit(source))
    packages.pop(None, None)
    return {name: targets - {None} for name, targets in packages.items()}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(REPO / PACKAGE, PACKAGE)


def test_every_top_level_package_has_a_floor(graph):
    missing = sorted({unit(m) for m in graph} - {None} - set(scaling.FLOORS))
    assert not missing, f"give these a floor in scaling.FLOORS: {missing}"
    stale = sorted(set(scaling.FLOORS) - {unit(m) for m in graph})
    assert not stale, f"scaling.FLOORS names what no longer exists: {stale}"


def test_no_module_imports_from_a_higher_floor(graph):
    assert upward_imports(graph, scaling.FLOORS) == []


def test_no_import_circles_between_modules(graph):
    assert circles(graph) == []


def test_no_import_circles_between_packages(graph):
    assert circles(package_graph(graph)) == []


def test_the_reader_sees_imports_in_functions_and_catches_upward_ones_and_circles(tmp_path):
    """The checks above would pass on a reader that sees nothing, so this one shows it sees."""
    root = tmp_path / "pkg"
    files = {
        "__init__.py": "",
        "low/__init__.py": "from pkg.low import a\n",
        "low/a.py": "def f():\n    from pkg.high import server\n",
        "low/b.py": "from . import c\n",
        "low/c.py": "def g():\n    from pkg.low.b import thing\n",
        "high/__init__.py": "",
        "high/server.py": "import pkg.low.a\nfrom pkg.low import b\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    graph = import_graph(root, "pkg")
    assert graph["pkg.low"] == {"pkg.low.a"}
    assert graph["pkg.low.a"] == {"pkg.high.server"}
    assert graph["pkg.high.server"] == {"pkg.low.a", "pkg.low.b"}
    assert upward_imports(graph, {"low": 0, "high": 1}) == [
        "pkg.low.a (floor 0) -> pkg.high.server (floor 1)"]
    assert circles(graph) == [["pkg.high.server", "pkg.low.a"], ["pkg.low.b", "pkg.low.c"]]
    assert circles(package_graph(graph)) == [["high", "low"]]

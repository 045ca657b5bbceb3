"""No two modules of the package import each other, directly or around a loop.

Every import counts, wherever it stands: at module level, inside a function, or under
``if TYPE_CHECKING:``. A lazy import hides a cycle from Python, not from a reader: two modules
that import each other are one idea split in two. ``from pkg import name`` counts as an import of
``pkg.name`` when that is a module, else of ``pkg``; a package's ``__init__`` re-exporting its own
submodules is not an edge (that is what an ``__init__`` is for).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import thinkdiff

PACKAGE_ROOT = Path(thinkdiff.__file__).resolve().parent

# A module -> the modules it imports -> the names it takes from each.
Graph = dict[str, dict[str, set[str]]]


def module_names(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``package`` (itself included)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = [package.name, *path.relative_to(package).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports_of(path: Path, name: str, modules: set[str]) -> dict[str, set[str]]:
    """The package's modules that ``path`` imports anywhere in its body, with the names taken."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: dict[str, set[str]] = defaultdict(set)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    found[alias.name].add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: anchor at this module's package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                target = submodule if submodule in modules else base
                if target in modules:
                    found[target].add(alias.name)
    found.pop(name, None)
    if is_package:
        for target in [t for t in found if t.startswith(name + ".")]:
            del found[target]
    return found


def import_graph(package: Path) -> Graph:
    names = module_names(package)
    return {name: imports_of(path, name, set(names)) for name, path in names.items()}


def cycles(graph: Graph) -> list[list[str]]:
    """The groups of modules that reach each other (strongly connected components of size > 1).

    Iterative Tarjan, so a deep import chain cannot hit Python's recursion limit.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, targets = work[-1]
            for target in targets:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.get(target, {})))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
    return groups


def describe(graph: Graph, group: list[str]) -> str:
    """One cycle with the names that tie it, e.g. ``a -> b: f, g``."""
    lines = [" <-> ".join(group)]
    for source in group:
        for target, taken in sorted(graph[source].items()):
            if target in group:
                lines.append(f"  {source} -> {target}: {', '.join(sorted(taken))}")
    return "\n".join(lines)


def test_the_package_has_no_import_cycles() -> None:
    graph = import_graph(PACKAGE_ROOT)
    assert len(graph) > 50, f"found only {len(graph)} modules under {PACKAGE_ROOT}"
    found = cycles(graph)
    assert not found, "import cycles (move the shared piece down, or pass an object in):\n" + "\n".join(
        describe(graph, group) for group in found
    )


def _write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


@pytest.mark.parametrize(
    "b_imports_a",
    [
        "from pkg.a import f\n",
        "def g():\n    from pkg.a import f\n    return f\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import f\n",
        "from .a import f\n",
        "import pkg.a\n",
        "from pkg import a\n",
    ],
    ids=["top-level", "lazy", "type-checking", "relative", "import", "from-package"],
)
def test_a_cycle_is_found_however_the_import_is_written(tmp_path: Path, b_imports_a: str) -> None:
    package = _write(
        tmp_path,
        {"pkg/__init__.py": "", "pkg/a.py": "from pkg.b import g\ndef f(): ...\n", "pkg/b.py": b_imports_a},
    )
    graph = import_graph(package)
    assert cycles(graph) == [["pkg.a", "pkg.b"]]
    assert "pkg.a -> pkg.b: g" in describe(graph, ["pkg.a", "pkg.b"])


def test_a_loop_through_three_modules_is_one_cycle(tmp_path: Path) -> None:
    package = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/sub/__init__.py": "from pkg.sub.c import h\n",  # a re-export is not an edge
            "pkg/a.py": "from pkg.b import g\n",
            "pkg/b.py": "from pkg.sub.c import h\n",
            "pkg/sub/c.py": "from ..a import f\n",
            "pkg/d.py": "from pkg.a import f\n",  # imports into the loop, not part of it
        },
    )
    assert cycles(import_graph(package)) == [["pkg.a", "pkg.b", "pkg.sub.c"]]


def test_imports_without_a_loop_are_not_a_cycle(tmp_path: Path) -> None:
    package = _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.a import f\n",
            "pkg/a.py": "import os\nfrom pkg.b import g\n",
            "pkg/b.py": "from pkg import c\n",
            "pkg/c.py": "",
        },
    )
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.b": {"g"}}
    assert graph["pkg.b"] == {"pkg.c": {"c"}}
    assert cycles(graph) == []

"""The package's layers import only downwards: no cycle between its parts.

docs/design.md draws the layers; this keeps the drawing true. A part is a sub-package or a
top-level module of ``spice_libvirt``; an edge is a module-level import of one part by
another (an import inside a function, made late on purpose, is not an edge).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parent.parent / "spice_libvirt"


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _module_level_imports(tree: ast.Module) -> Iterator[str]:
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "spice_libvirt":
                yield from (alias.name for alias in node.names)
            elif node.module.startswith("spice_libvirt."):
                yield node.module.split(".")[1]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("spice_libvirt."):
                    yield alias.name.split(".")[1]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        part = _part(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets = {t for t in _module_level_imports(tree) if t != part}
        graph.setdefault(part, set()).update(targets)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_part_imports_one_that_imports_it_back() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_bottom_layers_know_nothing_of_what_uses_them() -> None:
    graph = _graph()
    assert graph["spice"] <= {"errors"}
    assert graph["files"] <= {"errors"}
    assert graph["host"] <= {"errors", "files"}
    assert "agent" not in graph["libvirt"] | graph["migration"] | graph["qemu"]
    assert "cli" not in set().union(*(v for k, v in graph.items() if k not in ("cli", "__main__")))

"""The shape of the house: the module import graph (every ``import`` statement, at module top or inside a
function, read with ``ast``) has no cycle, and no floor imports a higher one (activations < probes < sae <
experiments)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ("activations", "probes", "sae", "experiments")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for floor in FLOORS for p in sorted((ROOT / floor).rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to (a module, or the package holding the imported name)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from a.b import c`` counts ``a.b.c`` when it is a
    module, else ``a.b``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                dep = _resolve(t, modules)
                if dep is not None and dep != mod:
                    graph[mod].add(dep)
    return graph


def _floor(module: str) -> int:
    return FLOORS.index(module.split(".")[0])


def test_the_graph_reads_every_package() -> None:
    graph = import_graph()
    assert {"activations.pooling.base", "probes.scorer", "sae.probe", "experiments.sweep.engine"} <= set(
        graph
    )
    assert "probes.base" in graph["probes.scorer"]  # imports are found


def test_no_floor_imports_a_higher_floor() -> None:
    bad = [
        f"{m} -> {d}"
        for m, deps in sorted(import_graph().items())
        for d in sorted(deps)
        if _floor(d) > _floor(m)
    ]
    assert not bad, "a lower floor imports a higher one:\n" + "\n".join(bad)


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return [*stack[stack.index(d) :], d]
            if d not in state and (cycle := visit(d)) is not None:
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)) is not None:
            raise AssertionError("import cycle: " + " -> ".join(cycle))

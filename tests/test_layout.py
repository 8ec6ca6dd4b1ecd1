"""Package structure: no import cycles inside ovenet, lazy (function-level) imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import ovenet

PACKAGE = Path(ovenet.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom | ast.Import, modules: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = importer.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    # "from pkg import name" imports the module pkg.name when there is one, else a name that pkg's __init__ defines.
    return [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(name, path.name == "__init__.py", node, set(modules)):
                    if target in modules and target != name:
                        targets.add(target)
        graph[name] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle reported once (Tarjan's strongly connected components, then one path each)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_the_cycle_finder_finds_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_inside_ovenet():
    # Package __init__ files re-export their modules, so "ovenet.data" -> "ovenet.data.factory" is an edge; a
    # module importing its own package's __init__ would show up as a cycle, as it should.
    cycles = find_cycles(import_graph())
    assert cycles == [], "import cycles (lazy imports included): " + "; ".join(" <-> ".join(c) for c in cycles)


# What may import what (the README's Layout section): a part imports only parts on its own line or above.
LAYERS = [
    {"errors", "files"},
    {"config", "device", "threads"},
    {"data", "method", "geometry"},
    {"models", "inference", "metrics", "vis"},  # models.predict uses inference, which needs only data and torch
    {"losses", "checkpoint"},
    {"official"},
    {"weights", "export"},
    {"engine", "report"},  # report draws the learning rate from engine.optim's scheduler; engine writes the report
    {"quickstart"},
    {"cli", "ovenet"},
]


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ovenet"


def test_no_layer_reaches_up():
    level = {part: i for i, parts in enumerate(LAYERS) for part in parts}
    graph = import_graph()
    assert {_part(m) for m in graph} <= set(level), "a new part of ovenet needs a place in LAYERS (and the README)"
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                    if level[_part(b)] > level[_part(a)])
    assert upward == [], "imports that reach up a layer: " + ", ".join(upward)

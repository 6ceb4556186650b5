"""The package's import graph: every layer imports only the layers below it, and no module reaches itself again
through its imports.

From the ground up: `pipeline` (the model) imports nothing of the others; `server` (the HTTP API, the store, the
worker) and `weights` (where weights live, fetch, verify) may import `pipeline`, and neither imports the other;
`particalize` (settings, CLI, the composition of every layer's options) sits on top and may import them all.
Every import counts, one inside a function or under TYPE_CHECKING too: a lazy import is still a dependency.

Inside `pipeline` and `server` the same holds between subpackages: each subpackage counts as one node, each module at
a package's top as one more, and that graph has no circle; `SUBPACKAGES` lists each package's subpackages from the
ground up, and none reaches (through any chain of imports) one listed above it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("pipeline", "server", "weights", "particalize")
MAY_IMPORT = {
    "pipeline": {"pipeline"},
    "server": {"server", "pipeline"},
    "weights": {"weights", "pipeline"},
    "particalize": set(LAYERS),
}

KNOWN: set[tuple[str, str]] = set()
"""Known exceptions to the layering: none."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for layer in LAYERS for path in sorted((ROOT / layer).rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The package module `name` is, or is in (None for a module from elsewhere)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in MODULES else None


def imports_of(name: str) -> set[str]:
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:  # `from a import b` names the module a.b when there is one
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {target for target in map(_resolve, found) if target is not None and target != name}


GRAPH = {name: imports_of(name) for name in MODULES}

SUBPACKAGES = {
    "pipeline": ("pipeline.weight_files", "pipeline.lora", "pipeline.speed", "pipeline.parallel"),
    "server": ("server.processes", "server.store", "server.worker", "server.routes"),
}
"""Each package's subpackages, from the ground up: single weight files, LoRA stacks (on quantized layers), speed
options (on both), then context parallelism (which drives the generator); processes, the task store, the worker
(on both), the HTTP routes."""


def unit(name: str) -> str:
    """The node a module counts as: its subpackage (pipeline.lora for pipeline.lora.keys), else itself."""
    parts = name.split(".")
    if len(parts) >= 2:
        top = ".".join(parts[:2])
        if top in MODULES and MODULES[top].name == "__init__.py":
            return top
    return name


UNIT_GRAPH: dict[str, set[str]] = {}
for _name, _targets in GRAPH.items():
    UNIT_GRAPH.setdefault(unit(_name), set()).update(unit(t) for t in _targets if unit(t) != unit(_name))


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in graph.get(todo.pop(), set()) - seen:
            seen.add(target)
            todo.append(target)
    return seen


def _layer(name: str) -> str:
    return name.split(".")[0]


def test_no_import_runs_back_up_a_layer():
    upward = {(a, b) for a, targets in GRAPH.items() for b in targets if _layer(b) not in MAY_IMPORT[_layer(a)]}
    assert upward - KNOWN == set(), "imports that run back up (or across) a layer"
    assert KNOWN - upward == set(), "fixed: take these out of KNOWN"


def test_server_and_weights_do_not_import_each_other():
    across = {(a, b) for a, targets in GRAPH.items() for b in targets
              if {_layer(a), _layer(b)} == {"server", "weights"}}
    assert across == set()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
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
    return found


def test_no_module_imports_itself_through_others():
    graph = {a: {b for b in targets if (a, b) not in KNOWN} for a, targets in GRAPH.items()}
    assert _cycles(graph) == []


def test_the_graph_check_sees_lazy_relative_and_from_imports():
    """The check itself: the imports it must see are seen."""
    assert "particalize.compose" in GRAPH["particalize.cli"]  # imported inside a function
    assert "pipeline.params" in GRAPH["pipeline.inputs"]
    assert "server.store.store" in GRAPH["server.store"]  # a package's __init__ importing its modules
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_subpackage_has_its_place_in_the_order():
    on_disk = {unit(name) for name in MODULES if unit(name) != name or MODULES[name].name == "__init__.py"}
    listed = {sub for subs in SUBPACKAGES.values() for sub in subs}
    inside = {sub for sub in on_disk if sub.split(".")[0] in SUBPACKAGES and "." in sub}
    assert inside == listed


def test_no_circle_between_subpackages_and_the_modules_around_them():
    assert _cycles(UNIT_GRAPH) == []


def test_no_subpackage_reaches_one_above_it():
    upward = {(low, high) for subs in SUBPACKAGES.values() for i, low in enumerate(subs) for high in subs[i + 1:]
              if high in _reaches(UNIT_GRAPH, low)}
    assert upward == set()


def test_the_subpackage_check_sees_through_modules_in_between():
    assert unit("pipeline.lora.keys") == "pipeline.lora" and unit("pipeline.generator") == "pipeline.generator"
    assert "pipeline.weight_files" in UNIT_GRAPH["pipeline.lora"]
    assert "pipeline.speed" in _reaches(UNIT_GRAPH, "pipeline.parallel")  # through pipeline.generator
    assert _reaches({"a": {"b"}, "b": {"c"}}, "a") == {"b", "c"}

"""The layers point one way and no module imports itself back.

Every .py file of the product (not tests/, not generated/) is parsed with ``ast``; every import
counts, at module level, inside a function or under ``if TYPE_CHECKING:``. From that graph:
no import cycle anywhere, and each layer imports only the layers below it:

    server -> handlers -> domain <- registry
    server -> clients ---^ (the dispatch port and plain values only)
    server -> registry, domain, reference (reference only lazily, for ``make run``)
    reference: standalone services; bench: may use anything, nothing uses it
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("domain", "registry", "handlers", "clients", "server", "reference", "bench")

# layer -> the layers it must not import (besides itself, any layer may import generated/).
FORBIDDEN: dict[str, frozenset[str]] = {
    "domain": frozenset({"registry", "handlers", "clients", "server", "reference", "bench"}),
    "registry": frozenset({"handlers", "clients", "server", "reference", "bench"}),
    "handlers": frozenset({"registry", "clients", "server", "reference", "bench"}),
    "clients": frozenset({"registry", "handlers", "server", "reference", "bench"}),
    "reference": frozenset({"domain", "registry", "handlers", "clients", "server", "bench"}),
    "server": frozenset({"bench"}),
    "bench": frozenset(),
}
# What clients may take from the domain: the port they implement and the plain values it carries.
# The ports' values: agents, conversation turns (domain.ports.platform speaks in them); the
# tracing port, whose spans the clients open around their calls.
CLIENTS_MAY_USE = frozenset(
    {
        "domain.dispatch",
        "domain.models",
        "domain.errors",
        "domain.agents",
        "domain.conversation",
        "domain.ports.tracing",
    }
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _product_files() -> dict[str, Path]:
    files = {}
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            files[_module_name(path)] = path
    return files


MODULES = _product_files()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, importer: str, level: int) -> str:
    """The absolute name of ``from <dots><module> import ...`` written in ``importer``."""
    if level == 0:
        return module
    base = importer.split(".")
    if not _is_package(importer):
        base.pop()
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _imported(tree: ast.Module, importer: str, *, top_level_only: bool) -> Iterator[str]:
    """Product modules named by the imports of one file. ``from pkg import name`` counts as
    ``pkg.name`` when that is a module, else as ``pkg``."""
    nodes = _run_at_import(tree) if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _known(alias.name)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node.module or "", importer, node.level)
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                yield from _known(submodule if submodule in MODULES else target)


def _run_at_import(tree: ast.Module) -> Iterator[ast.AST]:
    """The statements that run when the module is imported: not function bodies, not the
    ``if TYPE_CHECKING:`` blocks."""
    pending: list[ast.AST] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            pending.extend(node.orelse)
            continue
        yield node
        pending.extend(ast.iter_child_nodes(node))


def _known(name: str) -> Iterator[str]:
    """The product module an import names (the longest known prefix), if any."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            yield candidate
            return


def _graph(*, top_level_only: bool = False) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = set(_imported(tree, name, top_level_only=top_level_only)) - {name}
    return graph


GRAPH = _graph()


def _layer(module: str) -> str:
    return module.split(".")[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path that returns to its start) per strongly connected component of more
    than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(component)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, within it."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node] & component):
                if succ == start:
                    return [*paths[node], start]
                if succ not in paths:
                    paths[succ] = [*paths[node], succ]
                    following.append(succ)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def test_the_graph_covers_every_layer() -> None:
    """A guard on the parser itself: known edges are found, so an empty graph cannot pass."""
    assert {_layer(m) for m in MODULES} == set(PRODUCT)
    assert "domain.errors" in GRAPH["handlers.errors"]
    assert any(_layer(m) == "domain" for m in GRAPH["registry.memory_sessions"])


def test_the_cycle_finder_names_each_cycle_once() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert sorted(_cycles(graph)) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_each_layer_imports_only_what_it_may(layer: str) -> None:
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if _layer(module) == layer
        for target in targets
        if _layer(target) in FORBIDDEN[layer]
    )
    assert not wrong, f"{layer} imports what it must not:\n" + "\n".join(wrong)


def test_clients_use_only_the_dispatch_port_and_values_of_the_domain() -> None:
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if _layer(module) == "clients"
        for target in targets
        if _layer(target) == "domain"
        and target not in CLIENTS_MAY_USE
        and not target.startswith("domain.ports")
    )
    assert not wrong, "clients reach into the domain:\n" + "\n".join(wrong)


def test_the_production_cli_loads_no_reference_service_at_import() -> None:
    """``orchestrator serve`` must not import the reference services: only the code path of
    ORCH_EMBEDDED_REFERENCE (``make run``) imports them, inside a function."""
    top_level = _graph(top_level_only=True)
    seen = {"server.cli"}
    frontier = ["server.cli"]
    parent: dict[str, str] = {}
    while frontier:
        node = frontier.pop()
        for succ in top_level[node]:
            if succ not in seen:
                seen.add(succ)
                parent[succ] = node
                frontier.append(succ)
    loaded = sorted(m for m in seen if _layer(m) == "reference")
    chains = []
    for module in loaded:
        chain = [module]
        while chain[-1] in parent:
            chain.append(parent[chain[-1]])
        chains.append(" <- ".join(chain))
    assert not loaded, "server.cli loads at import:\n" + "\n".join(chains)

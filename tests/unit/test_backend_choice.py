"""Memory or Redis is chosen in one place: registry.backend.open_backend.

The rest of the product gets a registry.backend.Backend and never asks which kind it is: no
other module imports both an in-memory and a Redis implementation, server/ takes nothing from
registry/ but registry.backend, and no isinstance check on a backend class is left in server/.
Read from the same import graph as tests/unit/test_layers.py.
"""

from __future__ import annotations

import ast

from tests.unit.test_layers import GRAPH, MODULES

CHOOSER = "registry.backend"


def _variant(module: str) -> str | None:
    """The backend a registry module implements ("memory" or "redis"), else None."""
    if not module.startswith("registry."):
        return None
    name = module.removeprefix("registry.")
    for variant in ("memory", "redis"):
        if variant in name.split("_"):
            return variant
    return None


def test_the_graph_sees_both_variants() -> None:
    """A guard on the classification: both kinds of implementation modules are found."""
    assert _variant("registry.memory_jobs") == "memory"
    assert _variant("registry.api_keys_redis") == "redis"
    assert _variant("registry.keys") is None
    assert {_variant(m) for m in MODULES} >= {"memory", "redis"}


def test_only_registry_backend_imports_both_backends() -> None:
    choosers = sorted(
        module
        for module, targets in GRAPH.items()
        if {_variant(t) for t in targets} >= {"memory", "redis"}
    )
    assert choosers == [CHOOSER]


def test_server_takes_only_the_backend_from_registry() -> None:
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if module.startswith("server.")
        for target in targets
        if target.startswith("registry") and target != CHOOSER
    )
    assert not wrong, "server/ reaches past registry.backend:\n" + "\n".join(wrong)


def _class_checks(tree: ast.AST) -> list[str]:
    """The isinstance/issubclass calls that test for a Memory* or Redis* class."""
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"isinstance", "issubclass"}
            and len(node.args) == 2
        ):
            names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
            names |= {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
            if any(name.startswith(("Memory", "Redis")) for name in names):
                found.append(ast.unparse(node))
    return found


def test_the_class_check_finder_finds_a_backend_check() -> None:
    tree = ast.parse("if isinstance(registry.backend, RedisBackend): pass\nisinstance(x, int)")
    assert _class_checks(tree) == ["isinstance(registry.backend, RedisBackend)"]


def test_server_never_checks_which_backend_class_it_has() -> None:
    wrong = [
        f"{module}: {check}"
        for module, path in sorted(MODULES.items())
        if module.startswith("server.")
        for check in _class_checks(ast.parse(path.read_text(), filename=str(path)))
    ]
    assert not wrong, "server/ branches on a backend class:\n" + "\n".join(wrong)

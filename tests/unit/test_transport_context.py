"""Where the request context lives: transport metadata (request id, traceparent, the caller of
the call) is bound by the edge in handlers.request_context; domain code receives plain values
(domain.dispatch.CallContext, tenant ids) and reads no context variable."""

from __future__ import annotations

import ast
from pathlib import Path

DOMAIN = Path(__file__).resolve().parents[2] / "domain"


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


def test_no_domain_module_uses_context_variables() -> None:
    users = sorted(
        str(path.relative_to(DOMAIN.parent))
        for path in DOMAIN.rglob("*.py")
        if "contextvars" in imported_modules(path)
    )
    assert users == []

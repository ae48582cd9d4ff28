"""Registry helpers shared by the storage tests: opening a backend the way the tests configure
it, creating a session, and counting the round trips to Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from domain.ids import new_id
from domain.models import NewSession
from registry.backend import Backend, BackendConfig, open_backend
from registry.redis_client import PooledConnection


@asynccontextmanager
async def opened_registry(url: str | None) -> AsyncIterator[Backend]:
    """The backend on ``url`` (None: the in-memory one), key prefix "test", closed after use."""
    opened = open_backend(
        BackendConfig(redis_url=url, key_prefix="test", session_retention_ms=60_000)
    )
    try:
        yield opened
    finally:
        await opened.aclose()


async def new_session(registry: Backend, tenant: str = "acme") -> str:
    """A fresh session of agent-1 for ``tenant``; returns its id."""
    session_id = new_id()
    await registry.sessions.create_session(
        tenant, session_id, NewSession("agent-1", "", {}, 60_000)
    )
    return session_id


def count_round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the requests any Redis client of this process writes (one per round trip: a
    pipeline is written at once), but the event readers' heartbeats (a timer's, not a call's)."""
    sent: list[int] = []
    original = PooledConnection.send_packed_command

    async def counting(self: PooledConnection, command: Any, check_health: bool = True) -> None:
        chunks = [command] if isinstance(command, bytes | str) else command
        if not any(b":evhb:{" in bytes(chunk) for chunk in chunks if not isinstance(chunk, str)):
            sent.append(1)
        await original(self, command, check_health)

    monkeypatch.setattr(PooledConnection, "send_packed_command", counting)
    return sent

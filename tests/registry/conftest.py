"""The registry contract suites run on three backends: process memory, one Redis and a Redis
Cluster of three masters (tests/support/redis_cluster.py, started once per session)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from registry.backend import Backend
from tests.support.registries import opened_registry


@pytest.fixture(params=["memory", "redis", "cluster"])
def backend_url(request: pytest.FixtureRequest) -> str | None:
    """Runs a test once per registry backend: None selects the in-memory one."""
    if request.param == "memory":
        return None
    if request.param == "cluster":
        return str(request.getfixturevalue("cluster_url"))
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture
async def registry(backend_url: str | None) -> AsyncIterator[Backend]:
    """The whole backend on ``backend_url``, opened for this test and closed after it."""
    async with opened_registry(backend_url) as opened:
        yield opened

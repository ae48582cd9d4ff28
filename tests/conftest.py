"""Shared fixtures: one private redis-server per test session, flushed before each test that
uses it, and real orchestrator servers on loopback."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping

import pytest
from redis.asyncio import Redis

from server.event_loop import loop_factory
from tests.support.redis_cluster import RedisClusterProcess
from tests.support.redis_process import RedisProcess, sweep_orphans
from tests.support.servers import RunningServer, running_server, test_settings

pytest_plugins = ["tests.support.watchdog"]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Servers left by an earlier run that was killed (no teardown ran) are stopped first."""
    sweep_orphans()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests run on the event loop the service runs on: ORCH_EVENT_LOOP (default uvloop)."""
    name = os.environ.get("ORCH_EVENT_LOOP", "uvloop")
    return {name: loop_factory(name)}


@pytest.fixture(scope="session")
def redis_process() -> Iterator[RedisProcess]:
    proc = RedisProcess()
    proc.start()
    yield proc
    proc.close()


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    """A Redis of this test's own, which it may stop, restart, pause or kill."""
    proc = RedisProcess()
    proc.start()
    yield proc
    proc.close()  # resumes a paused server first


@pytest.fixture
async def redis_url(redis_process: RedisProcess) -> str:
    """The private Redis, emptied for this test."""
    client = Redis.from_url(redis_process.url)
    await client.flushall()
    await client.aclose()
    return redis_process.url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcess]:
    """A private 3-master Redis Cluster, started once per test session (about 2 s)."""
    cluster = RedisClusterProcess()
    cluster.start()
    yield cluster
    cluster.close()


@pytest.fixture
def cluster_url(redis_cluster: RedisClusterProcess) -> str:
    """The private cluster's ``redis+cluster://`` URL, every master emptied for this test."""
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, protocol=3, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture(params=["memory", "redis"])
def backend_url(request: pytest.FixtureRequest) -> str | None:
    """Runs a test once per registry backend: None selects the in-memory one."""
    if request.param == "memory":
        return None
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture
async def server(backend_url: str | None) -> AsyncIterator[RunningServer]:
    """A real orchestrator server on a free port, once per backend."""
    async with running_server(test_settings(backend_url)) as running:
        yield running


@pytest.fixture
async def redis_server(redis_url: str) -> AsyncIterator[RunningServer]:
    """A real orchestrator server on the private Redis."""
    async with running_server(test_settings(redis_url)) as running:
        yield running

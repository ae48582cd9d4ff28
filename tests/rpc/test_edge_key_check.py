"""The edge checks a key it has verified once together with the caller's rate: one Redis round
trip per call (counted with MONITOR on a real redis-server), with a revocation still refused at
the key's very next call, and a key that cannot be checked (Redis down) refused UNAVAILABLE,
never let through."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from orchestrator.admin.v1 import admin_pb2, admin_pb2_grpc
from tests.support.probe import Probe, echo_method
from tests.support.redis_process import RedisProcess
from tests.support.servers import RunningServer, admin, bearer, running_server, test_settings

Metadata = tuple[tuple[str, str], ...]
SENTINEL = "edge-key-check-sentinel"


async def created_key(server: RunningServer) -> tuple[str, Metadata]:
    """(key id, call metadata) of a client key of tenant acme, created through AdminService
    (stored in the server's real key store)."""
    reply = await admin_pb2_grpc.AdminServiceStub(server.channel).CreateApiKey(
        admin_pb2.CreateApiKeyRequest(
            tenant_id="acme", role=admin_pb2.API_KEY_ROLE_CLIENT, description="edge"
        ),
        metadata=admin(),
        timeout=10,
    )
    return reply.key_id, (bearer(reply.api_key),)


async def echo(server: RunningServer, metadata: Metadata) -> grpc.StatusCode:
    try:
        await echo_method(server.channel)(b"hi", metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def commands_during(redis_url: str, calls: Any) -> list[str]:
    """Every command a client sent Redis while ``calls()`` ran, as MONITOR shows them (the
    commands a script runs are left out: they are part of its one round trip)."""
    watcher = Redis.from_url(redis_url, decode_responses=True)
    seen: list[str] = []
    try:
        async with watcher.monitor() as monitor:
            await calls()
            await watcher.echo(SENTINEL)
            while True:
                entry = await monitor.next_command()
                command = str(entry["command"])
                if SENTINEL in command:
                    return seen
                if entry.get("client_type") != "lua":
                    seen.append(command)
    finally:
        await watcher.aclose()


@pytest.mark.parametrize("rate_limit_enabled", [True, False])
async def test_a_known_keys_call_checks_its_key_and_rate_in_one_redis_round_trip(
    redis_url: str, rate_limit_enabled: bool
) -> None:
    probe = Probe()
    settings = test_settings(redis_url, rate_limit_enabled=rate_limit_enabled)
    async with running_server(settings, extra_handlers=[probe.handler()]) as running:
        key_id, metadata = await created_key(running)
        assert await echo(running, metadata) == grpc.StatusCode.OK  # reads the key's record

        async def three_calls() -> None:
            for _ in range(3):
                assert await echo(running, metadata) == grpc.StatusCode.OK

        commands = await commands_during(redis_url, three_calls)
    about_the_key = [c for c in commands if key_id in c]
    assert len(about_the_key) == 3, about_the_key
    assert all(c.startswith("EVALSHA ") for c in about_the_key), about_the_key
    assert not [c for c in commands if "apikey:{k:" in c], "the key's record was read again"


@pytest.fixture(params=[True, False], ids=["rate-limited", "not-rate-limited"])
def rate_limit_enabled(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


async def test_a_known_key_revoked_is_refused_at_its_next_call(
    backend_url: str | None, rate_limit_enabled: bool
) -> None:
    probe = Probe()
    settings = test_settings(backend_url, rate_limit_enabled=rate_limit_enabled)
    async with running_server(settings, extra_handlers=[probe.handler()]) as running:
        key_id, metadata = await created_key(running)
        assert await echo(running, metadata) == grpc.StatusCode.OK
        assert await echo(running, metadata) == grpc.StatusCode.OK
        await admin_pb2_grpc.AdminServiceStub(running.channel).RevokeApiKey(
            admin_pb2.RevokeApiKeyRequest(key_id=key_id), metadata=admin(), timeout=10
        )
        assert await echo(running, metadata) == grpc.StatusCode.UNAUTHENTICATED
        assert await echo(running, metadata) == grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture
async def probed(own_redis: RedisProcess) -> AsyncIterator[RunningServer]:
    settings = test_settings(own_redis.url)
    async with running_server(settings, extra_handlers=[Probe().handler()]) as running:
        yield running


async def test_a_known_key_that_cannot_be_checked_is_refused_unavailable(
    probed: RunningServer, own_redis: RedisProcess
) -> None:
    _key_id, metadata = await created_key(probed)
    assert await echo(probed, metadata) == grpc.StatusCode.OK
    own_redis.stop()
    assert await asyncio.wait_for(echo(probed, metadata), 10) == grpc.StatusCode.UNAVAILABLE

"""Health reflects the backend: Redis down -> NOT_SERVING and UNAVAILABLE calls; Redis back ->
SERVING again, without restarting the server. The "liveness" entry stays SERVING through an
outage (a Kubernetes liveness probe must not restart pods because Redis is down). Graceful
shutdown reports NOT_SERVING on every entry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.v1 import session_pb2, session_pb2_grpc
from server.health import EVENTS_SERVICE, LIVENESS_SERVICE
from tests.support.redis_process import RedisProcess
from tests.support.servers import RunningServer, running_server, tenant, test_settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def outage_server(own_redis: RedisProcess) -> AsyncIterator[RunningServer]:
    async with running_server(test_settings(own_redis.url)) as running:
        yield running


async def wait_for_status(channel: grpc.aio.Channel, wanted: int, service: str = "") -> None:
    """Follow Health/Watch until it reports ``wanted`` (an event, not a poll)."""
    stub = health_pb2_grpc.HealthStub(channel)
    call = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=10)
    async for reply in call:
        if reply.status == wanted:
            call.cancel()
            return
    raise AssertionError(f"health never reported {wanted}")


async def create_session(server: RunningServer) -> session_pb2.CreateSessionResponse:
    stub = session_pb2_grpc.SessionServiceStub(server.channel)
    return await stub.CreateSession(
        session_pb2.CreateSessionRequest(agent_id="a"), metadata=tenant("acme"), timeout=10
    )


async def test_every_service_reports_serving_with_redis_up(outage_server: RunningServer) -> None:
    stub = health_pb2_grpc.HealthStub(outage_server.channel)
    for name in ("", "orchestrator.v1.SessionService", "orchestrator.v1.ChatService"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == SERVING


async def test_redis_outage_flips_health_and_fails_calls_fast_then_recovers(
    outage_server: RunningServer, own_redis: RedisProcess
) -> None:
    await create_session(outage_server)

    own_redis.stop()
    await wait_for_status(outage_server.channel, NOT_SERVING)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create_session(outage_server)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 5, "a dead Redis must fail calls fast, not hang them"

    own_redis.start()
    await wait_for_status(outage_server.channel, SERVING)
    reply = await create_session(outage_server)
    assert reply.session.state == session_pb2.SESSION_STATE_ACTIVE


async def test_graceful_shutdown_reports_not_serving_to_watchers(redis_url: str) -> None:
    async with running_server(test_settings(redis_url)) as running:
        stub = health_pb2_grpc.HealthStub(running.channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        first = await watch.read()
        assert first.status == SERVING
        stopping = asyncio.create_task(running.server.stop(grace=2))
        second = await watch.read()
        assert second.status == NOT_SERVING
        await stopping  # the grace period ends the watch; the server stops


async def test_health_list_reports_every_service_with_its_status(
    outage_server: RunningServer,
) -> None:
    stub = health_pb2_grpc.HealthStub(outage_server.channel)
    reply = await stub.List(health_pb2.HealthListRequest(), timeout=10)
    assert {name: entry.status for name, entry in reply.statuses.items()} == {
        "": SERVING,
        LIVENESS_SERVICE: SERVING,
        EVENTS_SERVICE: SERVING,
        "orchestrator.v1.SessionService": SERVING,
        "orchestrator.v1.ChatService": SERVING,
        "orchestrator.v1.BatchService": SERVING,
        "orchestrator.v1.TaskUpdateService": SERVING,
        "orchestrator.admin.v1.AdminService": SERVING,
        "orchestrator.internal.v1.PlatformService": SERVING,
    }


async def test_health_list_follows_an_outage(
    outage_server: RunningServer, own_redis: RedisProcess
) -> None:
    own_redis.stop()
    await wait_for_status(outage_server.channel, NOT_SERVING)
    reply = await health_pb2_grpc.HealthStub(outage_server.channel).List(
        health_pb2.HealthListRequest(), timeout=10
    )
    readiness = {name: e.status for name, e in reply.statuses.items() if name != LIVENESS_SERVICE}
    assert readiness, "List must name the registered services"
    assert set(readiness.values()) == {NOT_SERVING}
    assert reply.statuses[LIVENESS_SERVICE].status == SERVING


async def test_liveness_stays_serving_while_a_killed_redis_is_down(
    outage_server: RunningServer, own_redis: RedisProcess
) -> None:
    stub = health_pb2_grpc.HealthStub(outage_server.channel)
    live = await stub.Check(health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE), timeout=10)
    assert live.status == SERVING

    own_redis.kill()
    await wait_for_status(outage_server.channel, NOT_SERVING)
    live = await stub.Check(health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE), timeout=10)
    assert live.status == SERVING


async def test_liveness_reports_not_serving_on_graceful_shutdown(redis_url: str) -> None:
    async with running_server(test_settings(redis_url)) as running:
        stub = health_pb2_grpc.HealthStub(running.channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE), timeout=10)
        assert (await watch.read()).status == SERVING
        stopping = asyncio.create_task(running.server.stop(grace=2))
        assert (await watch.read()).status == NOT_SERVING
        await stopping

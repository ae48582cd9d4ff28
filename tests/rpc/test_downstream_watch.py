"""A configured downstream address that cannot be reached is flagged: a warning in the log and a
``downstream:<service>`` health entry NOT_SERVING, which turns SERVING once something listens
there; the server's own health entry does not depend on it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.downstream_watch import watched_services
from tests.support.redis_process import free_port
from tests.support.servers import running_server, test_settings

# A HealthCheckResponse.ServingStatus value.
Status = int


async def statuses(channel: grpc.aio.Channel, service: str) -> AsyncIterator[Status]:
    """Health/Watch of ``service``: each status it reports."""
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service))
    async for reply in call:
        yield reply.status


async def until(channel: grpc.aio.Channel, service: str, wanted: Status) -> None:
    async for status in statuses(channel, service):
        if status == wanted:
            return


async def test_an_unreachable_downstream_is_warned_about_and_not_serving_in_health(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="server.downstream_watch")
    nowhere = f"127.0.0.1:{free_port()}"
    settings = test_settings(
        None,
        query_service_address=nowhere,
        embedding_service_address=nowhere,
        downstream_check_interval=0.2,
        downstream_timeout=0.3,
    )
    async with running_server(settings) as server:
        await until(server.channel, "downstream:query", health_pb2.HealthCheckResponse.NOT_SERVING)
        await until(
            server.channel, "downstream:embedding", health_pb2.HealthCheckResponse.NOT_SERVING
        )
        overall = await health_pb2_grpc.HealthStub(server.channel).Check(
            health_pb2.HealthCheckRequest()
        )
        assert overall.status == health_pb2.HealthCheckResponse.SERVING
    assert f"downstream query at {nowhere} is unreachable" in caplog.text


async def test_a_downstream_that_starts_listening_turns_serving() -> None:
    port = free_port()
    settings = test_settings(
        None,
        query_service_address=f"127.0.0.1:{port}",
        embedding_service_address=f"127.0.0.1:{port}",
        downstream_check_interval=0.2,
        downstream_timeout=0.3,
    )
    async with running_server(settings) as server:
        await until(server.channel, "downstream:query", health_pb2.HealthCheckResponse.NOT_SERVING)
        downstream = grpc.aio.server()
        downstream.add_insecure_port(f"127.0.0.1:{port}")
        await downstream.start()
        try:
            await until(server.channel, "downstream:query", health_pb2.HealthCheckResponse.SERVING)
        finally:
            await downstream.stop(None)


def test_plans_watch_every_platform_service_and_one_call_watches_query_and_embedding() -> None:
    with_plans = watched_services(test_settings(None, plans=True, conversation_address="c:1"))
    assert {s.value for s in with_plans} == {
        "query",
        "embedding",
        "agent_execution",
        "workflow_engine",
        "conversation",
        "agent_management",
        "tool_registry",
    }
    assert with_plans[next(s for s in with_plans if s.value == "conversation")] == "c:1"
    without = watched_services(test_settings(None, plans=False))
    assert {s.value for s in without} == {"query", "embedding"}

"""Rate limits and the stream cap over real servers: RESOURCE_EXHAUSTED with RetryInfo, a
retry-after trailer, recovery after the delay, and one limit shared by replicas on one Redis."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from orchestrator.v1 import session_pb2, session_pb2_grpc
from tests.support.probe import EOF, Probe, watch_method
from tests.support.servers import RunningServer, running_server, tenant, test_settings

if TYPE_CHECKING:
    from orchestrator.v1.session_pb2_grpc import SessionServiceAsyncStub


def stub(server: RunningServer) -> SessionServiceAsyncStub:
    return session_pb2_grpc.SessionServiceStub(server.channel)


async def list_sessions(server: RunningServer, tenant_id: str) -> None:
    await stub(server).ListSessions(
        session_pb2.ListSessionsRequest(page_size=1), metadata=tenant(tenant_id)
    )


def retry_delay_s(error: grpc.aio.AioRpcError) -> float:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "expected rich error details"
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToMilliseconds()) / 1000
    raise AssertionError("no RetryInfo detail")


def quota_subjects(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            return [v.subject for v in failure.violations]
    return []


async def test_a_tenant_over_its_rate_is_refused_then_recovers(backend_url: str | None) -> None:
    settings = test_settings(backend_url, rate_limit_overrides="limited=5:3")
    async with running_server(settings) as server:
        for _ in range(3):
            await list_sessions(server, "limited")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_sessions(server, "limited")
        error = caught.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        delay = retry_delay_s(error)
        assert 0 < delay <= 0.2
        trailers: dict[str, Any] = dict(cast(Any, error.trailing_metadata()) or ())
        assert trailers["retry-after"] == "1"
        assert quota_subjects(error) == ["tenant:limited"]

        # Another tenant (default limits) is unaffected meanwhile.
        for _ in range(5):
            await list_sessions(server, "acme")

        await asyncio.sleep(delay)
        await list_sessions(server, "limited")


async def test_replicas_on_one_redis_share_the_limit(redis_url: str) -> None:
    settings = test_settings(redis_url, rate_limit_overrides="shared=0.5:4")
    async with running_server(settings) as first, running_server(settings) as second:
        for server in (first, second, first, second):
            await list_sessions(server, "shared")
        for server in (first, second):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await list_sessions(server, "shared")
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert retry_delay_s(caught.value) > 1


async def test_a_disabled_limit_never_refuses() -> None:
    settings = test_settings(None, rate_limit_enabled=False, rate_limit_overrides="x=1:1")
    async with running_server(settings) as server:
        for _ in range(5):
            await list_sessions(server, "x")


async def test_health_is_never_limited() -> None:
    settings = test_settings(None, rate_limit_rps=1.0, rate_limit_burst=1)
    async with running_server(settings) as server:
        health = health_pb2_grpc.HealthStub(server.channel)
        for _ in range(5):
            await health.Check(health_pb2.HealthCheckRequest())


async def test_open_streams_are_capped_per_tenant() -> None:
    probe = Probe()
    settings = test_settings(None, max_streams_per_tenant=2)
    async with running_server(settings, extra_handlers=[probe.handler()]) as server:
        watch = watch_method(server.channel)
        streams = [watch(b"", metadata=tenant("acme")) for _ in range(2)]
        for stream in streams:
            assert await stream.read() == b"open"

        third = watch(b"", metadata=tenant("acme"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await third.read()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert quota_subjects(caught.value) == ["tenant:acme"]

        other = watch(b"", metadata=tenant("globex"))
        assert await other.read() == b"open"

        # Ending the streams frees the slots: the status arrives after the server let go.
        probe.release.set()
        for stream in [*streams, other]:
            assert await stream.read() is EOF
            assert await stream.code() == grpc.StatusCode.OK
        again = watch(b"", metadata=tenant("acme"))
        assert await again.read() == b"open"
        assert await again.read() is EOF

"""Rate limits and the stream cap over real servers: RESOURCE_EXHAUSTED with RetryInfo, a
retry-after trailer, recovery after the delay, and one limit shared by replicas on one Redis
(in one process, and as two `orchestrator serve` processes)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from domain.api_keys import format_key
from orchestrator.admin.v1 import admin_pb2, admin_pb2_grpc
from orchestrator.v1 import session_pb2, session_pb2_grpc
from tests.support.probe import EOF, Probe, watch_method
from tests.support.processes import ServerProcess
from tests.support.servers import RunningServer, bearer, running_server, tenant, test_settings

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


# The server processes store it at start (ORCH_BOOTSTRAP_ADMIN_KEY); the test keys of
# tests.support.keys only work in servers the tests build in-process.
PROCESS_ADMIN_KEY = format_key("ratelimitadmin", "two-processes-admin-secret")


@pytest.fixture
def two_processes(redis_url: str, tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two `orchestrator serve` processes on the test Redis; tenant "shared" may make a burst
    of 4 calls, then one every 2 s."""
    env = {
        "REDIS_URL": redis_url,
        "ORCH_BOOTSTRAP_ADMIN_KEY": PROCESS_ADMIN_KEY,
        "ORCH_RATE_LIMIT_OVERRIDES": "shared=0.5:4",
        "ORCH_BATCH_WORKER_ENABLED": "false",
    }
    processes = [ServerProcess(tmp_path / f"server-{n}.log", **env) for n in (1, 2)]
    try:
        with ThreadPoolExecutor(len(processes)) as pool:  # both start at once
            for started in [pool.submit(process.start) for process in processes]:
                started.result()
        yield processes[0], processes[1]
    finally:
        for process in processes:
            process.kill()


async def test_two_server_processes_share_one_limit_and_recover_after_the_advertised_delay(
    two_processes: tuple[ServerProcess, ServerProcess],
) -> None:
    first, second = two_processes
    async with (
        grpc.aio.insecure_channel(first.address) as one,
        grpc.aio.insecure_channel(second.address) as two,
    ):
        created = await admin_pb2_grpc.AdminServiceStub(one).CreateApiKey(
            admin_pb2.CreateApiKeyRequest(
                tenant_id="shared", role=admin_pb2.API_KEY_ROLE_CLIENT, description="rate test"
            ),
            metadata=(bearer(PROCESS_ADMIN_KEY),),
        )
        client = (bearer(created.api_key),)

        async def list_on(channel: grpc.aio.Channel) -> None:
            await session_pb2_grpc.SessionServiceStub(channel).ListSessions(
                session_pb2.ListSessionsRequest(page_size=1), metadata=client, timeout=5
            )

        for channel in (one, two):
            await asyncio.wait_for(channel.channel_ready(), 5)
        for channel in (one, two, one, two):  # the burst, spent across both processes
            await list_on(channel)

        delay = 0.0
        for channel in (one, two):  # whichever process is hit next refuses
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await list_on(channel)
            error = caught.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            delay = retry_delay_s(error)
            assert 0 < delay <= 2.0  # at most one request's worth at 0.5 per second
            trailers: dict[str, Any] = dict(cast(Any, error.trailing_metadata()) or ())
            assert 1 <= int(trailers["retry-after"]) <= math.ceil(delay)
            assert quota_subjects(error) == ["tenant:shared"]

        await asyncio.sleep(delay)  # exactly what the last refusal advertised
        await list_on(one)
        # That one request was all the limit had regained, for both processes.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_on(two)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


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

"""The Prometheus endpoint of a real server after a few calls, and the registry-wide gauges
(tasks by state, queue depth) its sampler keeps current."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.v1 import session_pb2, session_pb2_grpc
from server import metrics
from server.app import OrchestratorServer
from tests.support.batches import llm_item, submit
from tests.support.downstream import RecordingDispatcher
from tests.support.flow import Flow, completed, notice, read_to_end
from tests.support.probe import WATCH, Probe, watch_method
from tests.support.servers import RunningServer, running_server, tenant, test_settings

LIST = "/orchestrator.v1.SessionService/ListSessions"
GET = "/orchestrator.v1.SessionService/GetSession"
Samples = dict[tuple[Any, ...], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, by (name, *sorted label pairs)."""
    return {
        (sample.name, *sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(server: RunningServer) -> str:
    assert server.server.metrics_http is not None
    url = f"http://127.0.0.1:{server.server.metrics_http.port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return await response.text()


async def scrape_until(server: RunningServer, wanted: Callable[[Samples], bool]) -> Samples:
    """Scrape until ``wanted`` holds: the gauges change when the sampler next runs, an event
    the endpoint cannot report, so poll with a bounded deadline."""
    deadline = time.monotonic() + 10
    while not wanted(found := samples(await scrape(server))):
        assert time.monotonic() < deadline, f"never matched; last scrape: {found}"
        await asyncio.sleep(0.02)
    return found


def tasks(found: Samples) -> tuple[float | None, float | None]:
    """The (pending, running) tasks gauges."""
    return (
        found.get(("orchestrator_tasks", ("state", "pending"))),
        found.get(("orchestrator_tasks", ("state", "running"))),
    )


def batch_queue(found: Samples) -> dict[str, float | None]:
    """The batch queue's depth by state."""
    return {
        state: found.get(("orchestrator_queue_depth", ("queue", "batch"), ("state", state)))
        for state in ("ready", "leased", "delayed", "dead")
    }


async def test_metrics_count_calls_codes_latency_streams_and_refusals() -> None:
    probe = Probe()
    settings = test_settings(None, rate_limit_overrides="limited=0.5:1")
    async with running_server(settings, extra_handlers=[probe.handler()]) as server:
        sessions = session_pb2_grpc.SessionServiceStub(server.channel)
        for _ in range(3):
            await sessions.ListSessions(session_pb2.ListSessionsRequest(), metadata=tenant("acme"))
        with pytest.raises(grpc.aio.AioRpcError):
            await sessions.GetSession(
                session_pb2.GetSessionRequest(session_id="nope"), metadata=tenant("acme")
            )
        await sessions.ListSessions(session_pb2.ListSessionsRequest(), metadata=tenant("limited"))
        with pytest.raises(grpc.aio.AioRpcError):
            await sessions.ListSessions(
                session_pb2.ListSessionsRequest(), metadata=tenant("limited")
            )
        stream = watch_method(server.channel)(b"", metadata=tenant("acme"))
        assert await stream.read() == b"open"
        metrics.record_tokens("acme", 42)  # outside an RPC: goes to the running server
        metrics.record_notice("accepted")

        text = await scrape(server)

        probe.release.set()
        await stream.read()

    found = samples(text)
    assert found["orchestrator_rpcs_total", ("code", "OK"), ("method", LIST)] == 4
    assert found["orchestrator_rpcs_total", ("code", "RESOURCE_EXHAUSTED"), ("method", LIST)] == 1
    assert found["orchestrator_rpcs_total", ("code", "INVALID_ARGUMENT"), ("method", GET)] == 1
    assert found["orchestrator_rpc_duration_seconds_bucket", ("le", "+Inf"), ("method", LIST)] == 5
    assert found["orchestrator_rpc_duration_seconds_count", ("method", LIST)] == 5
    assert found["orchestrator_open_streams", ("method", WATCH)] == 1
    assert found["orchestrator_rate_limited_total", ("limit", "tenant"), ("tenant", "limited")] == 1
    assert found["orchestrator_tokens_total", ("tenant", "acme")] == 42
    assert found["orchestrator_notices_total", ("verdict", "accepted")] == 1
    # The raw exposition has the usual shape too.
    assert f'orchestrator_rpcs_total{{code="OK",method="{LIST}"}} 4.0' in text


async def test_standard_grpc_metrics_name_the_service_method_type_and_code() -> None:
    probe = Probe()
    async with running_server(test_settings(None), extra_handlers=[probe.handler()]) as server:
        sessions = session_pb2_grpc.SessionServiceStub(server.channel)
        await sessions.ListSessions(session_pb2.ListSessionsRequest(), metadata=tenant("acme"))
        stream = watch_method(server.channel)(b"", metadata=tenant("acme"))
        assert await stream.read() == b"open"
        probe.release.set()
        await stream.read()
        await stream.code()
        found = samples(await scrape(server))
    unary = (
        ("grpc_method", "ListSessions"),
        ("grpc_service", "orchestrator.v1.SessionService"),
        ("grpc_type", "unary"),
    )
    assert found[("grpc_server_handled_total", ("grpc_code", "OK"), *unary)] == 1
    assert found[("grpc_server_handling_seconds_count", *unary)] == 1
    service, _, method = WATCH.lstrip("/").rpartition("/")
    watched = (("grpc_method", method), ("grpc_service", service), ("grpc_type", "server_stream"))
    assert found[("grpc_server_handling_seconds_count", *watched)] == 1


async def test_two_servers_keep_separate_registries() -> None:
    async with (
        running_server(test_settings(None)) as first,
        running_server(test_settings(None)) as second,
    ):
        await session_pb2_grpc.SessionServiceStub(first.channel).ListSessions(
            session_pb2.ListSessionsRequest(), metadata=tenant("acme")
        )
        assert LIST in await scrape(first)
        assert LIST not in await scrape(second)


async def test_an_empty_address_disables_the_endpoint() -> None:
    server = OrchestratorServer(test_settings(None, metrics_address=""))
    await server.start()
    try:
        assert server.metrics_http is None
    finally:
        await server.stop(grace=0)


async def test_the_tasks_gauge_follows_a_job_from_pending_to_running_to_finished(
    backend_url: str | None,
) -> None:
    dispatcher = RecordingDispatcher()
    settings = test_settings(backend_url, metrics_sample_interval=0.05)
    async with running_server(settings, dispatcher=dispatcher) as server:
        await scrape_until(server, lambda found: tasks(found) == (0, 0))
        flow = Flow(server, dispatcher)
        call, accepted = await flow.start_job(await flow.new_session())
        await scrape_until(server, lambda found: tasks(found) == (1, 0))

        await flow.publish([notice(accepted.job_id, 1, "progress", progress=0.5)])
        await scrape_until(server, lambda found: tasks(found) == (0, 1))

        await flow.publish([completed(accepted.job_id, 2, "done")])
        await read_to_end(call)
        await scrape_until(server, lambda found: tasks(found) == (0, 0))


async def test_the_queue_depth_gauge_counts_queued_batch_items(backend_url: str | None) -> None:
    # test_settings leave the embedded batch worker off, so submitted items stay ready.
    dispatcher = RecordingDispatcher()
    settings = test_settings(backend_url, metrics_sample_interval=0.05)
    async with running_server(settings, dispatcher=dispatcher) as server:
        await scrape_until(server, lambda found: batch_queue(found)["ready"] == 0)
        flow = Flow(server, dispatcher)
        await submit(flow, [llm_item(f"item-{i}") for i in range(3)])
        found = await scrape_until(server, lambda found: batch_queue(found)["ready"] == 3)
        assert batch_queue(found) == {"ready": 3, "leased": 0, "delayed": 0, "dead": 0}

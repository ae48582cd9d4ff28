"""The health monitor's loop (domain.periodic): a probe that fails unexpectedly (not an outage)
does not end the probing."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2

from server.health import EVENTS_SERVICE, LIVENESS_SERVICE, HealthMonitor, HealthServicer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_probing_goes_on_after_a_probe_fails_unexpectedly() -> None:
    probes: asyncio.Queue[str] = asyncio.Queue()
    outcomes = [RuntimeError("probe bug")]

    async def probe() -> None:
        if outcomes:
            probes.put_nowait("failed")
            raise outcomes.pop()
        probes.put_nowait("ok")

    monitor = HealthMonitor(HealthServicer(), ["svc"], probe, interval_s=0.001)
    monitor.start()
    try:
        assert await asyncio.wait_for(probes.get(), 5) == "failed"
        assert await asyncio.wait_for(probes.get(), 5) == "ok"
        assert await asyncio.wait_for(probes.get(), 5) == "ok"  # the first one was published
        assert monitor.serving
    finally:
        await monitor.shutdown()
    assert not monitor.running


async def test_a_silent_event_reader_takes_readiness_and_the_events_entry_down_until_it_hears() -> (
    None
):
    problems: list[str | None] = ["event reader of n1 heard no heartbeat for 5 s", None]

    async def probe() -> None:
        return None

    servicer = HealthServicer()
    monitor = HealthMonitor(
        servicer, ["svc"], probe, interval_s=1.0, events_problem=lambda: problems[0]
    )
    assert await monitor.check_once()  # the backend itself is up
    assert servicer._server_status == {
        LIVENESS_SERVICE: SERVING,
        EVENTS_SERVICE: NOT_SERVING,
        "": NOT_SERVING,
        "svc": NOT_SERVING,
    }
    problems.pop(0)
    await monitor.check_once()
    assert set(servicer._server_status.values()) == {SERVING}

"""The health monitor's loop (domain.periodic): a probe that fails unexpectedly (not an outage)
does not end the probing."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2

from server.health import HealthMonitor, HealthServicer

SERVING = health_pb2.HealthCheckResponse.SERVING


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

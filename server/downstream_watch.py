"""Flags a configured downstream service that cannot be reached: a warning in the log at start
(the first pass) and whenever it becomes unreachable, and a health entry per service,
``downstream:<service>`` (e.g. ``downstream:query``), SERVING while a connection to its address
can be made and NOT_SERVING while it cannot.

The entries are informational: the server's own entry ("") and its services' entries follow the
backend only (a downstream outage fails the jobs that need it, with a clear error, but does not
make the orchestrator unready). A reachable address is not proof that the right service answers
there: the check is a connection (gRPC channel READY), which a misspelt port or host fails.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import grpc
from grpc_health.v1 import health, health_pb2

from domain.models import Service
from domain.periodic import PeriodicTask
from server.config import Settings

log = logging.getLogger(__name__)

HEALTH_PREFIX = "downstream:"
# Reconnect quickly enough that a service that comes back is seen by the next pass.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def watched_services(settings: Settings) -> dict[Service, str]:
    """The downstream services this configuration calls, with their addresses: Query and
    Embedding, and with ORCH_PLANS the five platform services a plan may call."""
    from server.services import downstream_config

    config = downstream_config(settings)
    services = list(Service) if settings.plans else [Service.QUERY, Service.EMBEDDING]
    return {service: config.address(service) for service in services}


def health_name(service: Service) -> str:
    return f"{HEALTH_PREFIX}{service.value}"


class DownstreamWatch(PeriodicTask):
    """Connects to each distinct downstream address every ``interval_s`` (the first pass at
    start), waiting at most ``connect_timeout_s``; publishes and logs what it finds."""

    def __init__(
        self,
        servicer: health.aio.HealthServicer,  # type: ignore[name-defined]
        services: Mapping[Service, str],
        *,
        interval_s: float,
        connect_timeout_s: float,
    ) -> None:
        super().__init__("downstream-watch", self.check_once, interval_s)
        self.servicer = servicer
        self.services = dict(services)
        self._connect_timeout_s = connect_timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.reachable: dict[Service, bool] = {}

    async def check_once(self) -> dict[Service, bool]:
        """One pass: every distinct address probed at once; returns reachability by service."""
        addresses = sorted(set(self.services.values()))
        results = await asyncio.gather(*(self._connects(a) for a in addresses))
        up = dict(zip(addresses, results, strict=True))
        for service, address in self.services.items():
            now, before = up[address], self.reachable.get(service)
            if not now and before is not False:
                log.warning(
                    "downstream %s at %s is unreachable (no connection within %.1fs): its "
                    "calls will fail; check the address setting (orchestrator settings "
                    "prints it), health %s says NOT_SERVING until it answers",
                    service.value,
                    address,
                    self._connect_timeout_s,
                    health_name(service),
                )
            elif now and before is False:
                log.info("downstream %s at %s is reachable again", service.value, address)
            self.reachable[service] = now
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if now
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await self.servicer.set(health_name(service), status)
        return dict(self.reachable)

    async def _connects(self, address: str) -> bool:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
            self._channels[address] = channel
        try:
            await asyncio.wait_for(channel.channel_ready(), self._connect_timeout_s)
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        """Stop the passes and close the channels."""
        await self.stop()
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close(grace=None)

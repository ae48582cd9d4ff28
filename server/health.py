"""The gRPC health service, driven by a watcher that probes the storage backend."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from domain.errors import Unavailable
from domain.periodic import PeriodicTask

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# The liveness entry: SERVING from the first probe until shutdown, whatever the backend does,
# so a liveness probe (Kubernetes) never restarts a process only because Redis is down. The
# other entries ("" and each service) are readiness: NOT_SERVING while the backend is down.
LIVENESS_SERVICE = "liveness"

# The entry of this process's live event readers (registry.redis_events): NOT_SERVING while
# one of them is silent (no heartbeat heard for ORCH_EVENT_HEARTBEAT_TIMEOUT), and readiness
# with it: streams served here would miss live events until the reader recovers. Like every
# readiness entry it is NOT_SERVING during a backend outage too.
EVENTS_SERVICE = "events"

# More entries than this and List answers RESOURCE_EXHAUSTED, as the health protocol allows.
MAX_LISTED_SERVICES = 100


class HealthServicer(health.aio.HealthServicer):  # type: ignore[name-defined,misc]
    """grpc's aio health servicer plus ``List`` (grpc's leaves it UNIMPLEMENTED although
    reflection offers it): every registered entry ("" for the server) with its status."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: Any
    ) -> health_pb2.HealthListResponse:
        statuses = dict(self._server_status)
        if len(statuses) > MAX_LISTED_SERVICES:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"more than {MAX_LISTED_SERVICES} health entries; use Check or Watch",
            )
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in statuses.items()
            }
        )


class HealthMonitor(PeriodicTask):
    """Sets every service (and the overall "" entry) SERVING while ``probe`` succeeds and
    NOT_SERVING while it fails; flips back on its own when the backend returns. Also
    NOT_SERVING while ``events_problem`` names one (a silent event reader), with the
    ``EVENTS_SERVICE`` entry saying so. Probes every
    ``interval_s`` (domain.periodic runs the loop). ``LIVENESS_SERVICE`` is SERVING from the
    first probe on, whatever its outcome, until ``shutdown()``."""

    def __init__(
        self,
        servicer: health.aio.HealthServicer,  # type: ignore[name-defined]
        services: Iterable[str],
        probe: Callable[[], Awaitable[None]],
        *,
        interval_s: float,
        events_problem: Callable[[], str | None] = lambda: None,
    ) -> None:
        super().__init__("health-monitor", self.check_once, interval_s)
        self.servicer = servicer
        self._names = ["", *services]
        self._probe = probe
        self._events_problem = events_problem
        self._events_ok: bool | None = None
        self._probe_timeout_s = max(interval_s, 1.0)
        self._serving: bool | None = None
        self._shut_down = False

    @property
    def serving(self) -> bool:
        return bool(self._serving)

    async def check_once(self) -> bool:
        """Probe now and publish the result (readiness also needs the event readers to hear
        their heartbeats); returns whether the backend is up."""
        try:
            await asyncio.wait_for(self._probe(), timeout=self._probe_timeout_s)
            ok = True
        except (Unavailable, TimeoutError) as exc:
            ok = False
            if self._serving is not False:
                log.warning("backend unavailable, health NOT_SERVING: %s", exc)
        if ok and self._serving is False:
            log.info("backend reachable again, health SERVING")
        problem = self._events_problem()
        if problem is not None and self._events_ok is not False:
            log.warning("health %s NOT_SERVING: %s", EVENTS_SERVICE, problem)
        elif problem is None and self._events_ok is False:
            log.info("event readers hear their heartbeats again, health %s SERVING", EVENTS_SERVICE)
        # Live events need the backend too: the entry follows an outage as every other does.
        await self._publish(ok and problem is None, events_ok=ok and problem is None)
        return ok

    async def _publish(self, ok: bool, *, events_ok: bool = True) -> None:
        if self._shut_down:
            return
        self._serving = ok
        self._events_ok = events_ok
        await self.servicer.set(LIVENESS_SERVICE, SERVING)
        await self.servicer.set(EVENTS_SERVICE, SERVING if events_ok else NOT_SERVING)
        for name in self._names:
            await self.servicer.set(name, SERVING if ok else NOT_SERVING)

    async def shutdown(self) -> None:
        """Stop probing and report NOT_SERVING for good (graceful shutdown). A probe in
        progress publishes nothing any more (a cancel landing inside a Redis call can come back
        as a connection error, which check_once() would take for an outage)."""
        self._shut_down = True
        await self.stop()
        await self.servicer.enter_graceful_shutdown()

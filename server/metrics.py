"""Prometheus metrics: RPC counts and latency, open streams, rate-limit rejections, the job
flow's gauges and counters and the agent cache's hits and misses, served over HTTP at
``/metrics``.

Each server owns a ``Metrics`` with its own CollectorRegistry (not prometheus_client's global
one), so several servers in one process (tests, benchmarks) neither collide nor mix counts.

Code outside the interceptors records through the module functions (``record_notice``,
``record_tokens``, ``record_agent_cache``): they write to the Metrics bound to the current RPC
(the metrics interceptor binds it) or, outside of an RPC (background workers), to the one the
running server installed with ``install``. With neither they do nothing. The registry-wide
gauges (tasks by state, queue depth) have one writer, the server's sampler
(server.metrics_sampler).
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from server.rpc_metrics import RpcCollector, RpcRecorder

log = logging.getLogger(__name__)

# RPC latency buckets, in seconds: sub-millisecond unary calls up to minute-long streams.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


OTHER_TENANTS = "_other"


class TenantLabels:
    """Bounds the ``tenant`` label's values: the first ``limit`` tenants seen keep their own
    series, every later one is counted as ``_other`` (so a platform with many tenants does not
    grow each per-tenant metric without bound)."""

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, tenant: str) -> str:
        seen = self._seen
        if tenant in seen:
            return tenant
        if len(seen) < self._limit:
            seen.add(tenant)
            return tenant
        return OTHER_TENANTS


class Metrics:
    """Every metric of one server, registered in its own registry."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, max_tenants: int = 1000
    ) -> None:
        self._tenant = TenantLabels(max_tenants)
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        # RPC counts and latency: kept without a lock per call (server.rpc_metrics).
        self.rpc = RpcCollector(LATENCY_BUCKETS)
        r.register(self.rpc)
        self.open_streams = Gauge(
            "orchestrator_open_streams",
            "Streaming RPCs open now, by method",
            ["method"],
            registry=r,
        )
        self.rate_limited = Counter(
            "orchestrator_rate_limited",
            "Calls refused by a limit, by tenant and limit (tenant, key or streams)",
            ["tenant", "limit"],
            registry=r,
        )
        self.tasks = Gauge(
            "orchestrator_tasks",
            "Unfinished tasks (jobs) of all tenants by state (queued, pending, running), as "
            "sampled from the registry",
            ["state"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "orchestrator_queue_depth",
            "Work queue items by queue and state (ready, leased, delayed, dead), as sampled "
            "from the registry",
            ["queue", "state"],
            registry=r,
        )
        self.notices = Counter(
            "orchestrator_notices",
            "Completion notices received, by verdict",
            ["verdict"],
            registry=r,
        )
        self.tokens = Counter(
            "orchestrator_tokens", "LLM tokens used, by tenant", ["tenant"], registry=r
        )
        self.agent_cache = Counter(
            "orchestrator_agent_cache_lookups",
            "Agent configuration lookups by outcome: hit (served from the shared agent cache) "
            "or miss (asked Agent Management)",
            ["outcome"],
            registry=r,
        )

    def recorder(self, method: str, rpc_type: str = "unary") -> RpcRecorder:
        """Where the calls of ``method`` are counted and timed (one object per method)."""
        return self.rpc.recorder(method, rpc_type)

    def stream_opened(self, method: str) -> None:
        self.open_streams.labels(method).inc()

    def stream_closed(self, method: str) -> None:
        self.open_streams.labels(method).dec()

    def record_rate_limited(self, tenant: str, limit: str) -> None:
        self.rate_limited.labels(self._tenant(tenant), limit).inc()

    def set_tasks(self, state: str, n: int) -> None:
        self.tasks.labels(state).set(n)

    def set_queue_depth(self, queue: str, state: str, n: int) -> None:
        self.queue_depth.labels(queue, state).set(n)

    def record_notice(self, verdict: str) -> None:
        self.notices.labels(verdict).inc()

    def record_tokens(self, tenant: str, n: int) -> None:
        if n > 0:
            self.tokens.labels(self._tenant(tenant)).inc(n)

    def record_agent_cache(self, outcome: str) -> None:
        self.agent_cache.labels(outcome).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


_bound: ContextVar[Metrics | None] = ContextVar("orchestrator_metrics", default=None)
_installed: Metrics | None = None


def bind(metrics: Metrics) -> None:
    """Bind ``metrics`` for the current RPC (its own task, so no reset is needed)."""
    _bound.set(metrics)


def install(metrics: Metrics | None) -> None:
    """The process-wide fallback for code running outside of an RPC (the last server started)."""
    global _installed
    _installed = metrics


def uninstall(metrics: Metrics) -> None:
    """Drop the fallback if it is still ``metrics`` (its server stopped)."""
    global _installed
    if _installed is metrics:
        _installed = None


def current() -> Metrics | None:
    return _bound.get() or _installed


def record_notice(verdict: str) -> None:
    """Count a completion notice by its verdict (e.g. accepted, rejected, duplicate)."""
    if (m := current()) is not None:
        m.record_notice(verdict)


def record_tokens(tenant: str, n: int) -> None:
    """Add ``n`` LLM tokens to the tenant's total."""
    if (m := current()) is not None:
        m.record_tokens(tenant, n)


def record_agent_cache(outcome: str) -> None:
    """Count an agent configuration lookup: ``hit`` or ``miss``."""
    if (m := current()) is not None:
        m.record_agent_cache(outcome)


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (IPv6 hosts in brackets) into host and port."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class MetricsHttpServer:
    """``GET /metrics`` on aiohttp, in the server's event loop. Port 0 binds a free port,
    readable as ``port`` after ``start()``."""

    def __init__(self, metrics: Metrics, address: str) -> None:
        self.metrics = metrics
        self.host, self.port = split_address(address)
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        address = runner.addresses[0]
        self.port = int(address[1])
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

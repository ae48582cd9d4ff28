"""The orchestrator's gRPC server: owns the options, the services, health and shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer as AioReflectionServicer

from clients.platform import PlatformClients
from domain.admin import AdminQueries
from domain.api_keys import ApiKeyManager
from domain.dispatch import Dispatcher
from domain.errors import Unavailable
from domain.identity import Caller, Role
from domain.operator import OperatorQueries
from domain.rate_limits import StreamSlots
from handlers.admin_operator import OperatorAdminServicer
from handlers.batches import BatchServicer
from handlers.chat import ChatServicer, add_chat_service
from handlers.internal_api import PlatformServicer
from handlers.sessions import SessionServicer
from handlers.task_updates import TaskUpdateServicer
from orchestrator.admin.v1 import admin_pb2, admin_pb2_grpc
from orchestrator.internal.v1 import platform_pb2, platform_pb2_grpc
from orchestrator.v1 import (
    batch_pb2,
    batch_pb2_grpc,
    chat_pb2,
    session_pb2,
    session_pb2_grpc,
    task_update_pb2,
    task_update_pb2_grpc,
)
from registry.backend import Backend, open_backend
from server import metrics as metrics_module
from server.auth import AUTHORIZATION_HEADER, Authenticator, authorize
from server.auth_failures import AuthFailures
from server.backend_config import backend_config
from server.config import Settings
from server.data_loss import DataLossWatch, warn_without_persistence
from server.downstream_watch import DownstreamWatch, watched_services
from server.edge import Edge, EdgeRegistrar
from server.edge_limits import EdgeLimits
from server.gc_tuning import settle_heap
from server.health import HealthMonitor, HealthServicer
from server.key_seeding import seed_keys, warn_without_keys
from server.listen import ListenError, ensure_free
from server.metrics import Metrics, MetricsHttpServer
from server.metrics_sampler import MetricsSampler
from server.revocation import OpenStreams, RevocationWatch
from server.services import (
    BATCH_QUEUE,
    CHAT_QUEUE,
    PlatformPorts,
    build_services,
    default_dispatcher,
    default_platform,
)
from server.signals import wait_for_stop_signal
from server.tracing import tracing_for, tracing_interceptor
from server.workers import QueueWorkers
from server.ws_bridge import WebSocketBridge

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
    chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name,
    batch_pb2.DESCRIPTOR.services_by_name["BatchService"].full_name,
    task_update_pb2.DESCRIPTOR.services_by_name["TaskUpdateService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    platform_pb2.DESCRIPTOR.services_by_name["PlatformService"].full_name,
)


def websocket_identity(
    authenticator: Authenticator,
) -> Callable[[dict[str, str]], Awaitable[Caller]]:
    """The WebSocket bridge's caller: the same bearer API keys as gRPC, service role only."""

    async def identify(headers: dict[str, str]) -> Caller:
        caller = await authenticator.authenticate_bearer(headers.get(AUTHORIZATION_HEADER))
        authorize(caller, Role.SERVICE)
        return caller

    return identify


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments: message limits, keepalive for long-lived streams, port reuse."""
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Let clients keep idle streams alive with pings every 10 s or more.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 1 if settings.so_reuseport else 0),
    ]


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured PEM files, or None to serve plaintext. With a
    client CA file, every client must present a certificate signed by it (mTLS)."""
    if not settings.tls_cert_file or not settings.tls_key_file:
        return None
    key = Path(settings.tls_key_file).read_bytes()
    chain = Path(settings.tls_cert_file).read_bytes()
    client_ca = (
        Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    )
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def loop_name() -> str:
    """The running event loop's kind: uvloop or asyncio."""
    return "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"


def transport_name(settings: Settings) -> str:
    if settings.tls_client_ca_file:
        return "mutual TLS"
    return "TLS" if settings.tls_cert_file else "plaintext"


class OrchestratorServer:
    """One server process: build with settings, ``start()``, then ``stop()``."""

    def __init__(
        self,
        settings: Settings,
        *,
        backend: Backend | None = None,
        dispatcher: Dispatcher | None = None,
        platform: PlatformPorts | None = None,
        tracer_provider: Any = None,
        extra_handlers: Sequence[grpc.GenericRpcHandler[Any, Any]] = (),
    ) -> None:
        self.settings = settings
        # None: the global OpenTelemetry provider (only used when settings.otel_enabled).
        self.tracer_provider = tracer_provider
        # Spans in jobs' traces and around downstream calls (server.tracing).
        self.tracing = tracing_for(settings.otel_enabled, tracer_provider)
        self.backend = backend or open_backend(backend_config(settings))
        self.dispatcher = dispatcher or default_dispatcher(settings, self.tracing)
        # The gRPC clients of Agent Management, Conversation and Tool Registry, unless given
        # (closed on stop only when opened here).
        self._platform_clients: PlatformClients | None = None
        if platform is None:
            platform = self._platform_clients = default_platform(settings, self.tracing)
        self.platform: PlatformPorts = platform
        self.services = build_services(
            settings, self.backend, self.dispatcher, self.platform, tracing=self.tracing
        )
        self.workers = QueueWorkers(settings, self.services)
        self.metrics = Metrics(max_tenants=settings.metrics_max_tenants)
        self.metrics_http: MetricsHttpServer | None = None
        # More services behind the same interceptors (tests and benchmarks use it).
        self.extra_handlers = tuple(extra_handlers)
        self.api_keys = ApiKeyManager(self.backend.api_keys)
        # Authenticates bearer API keys; the WebSocket bridge reuses it.
        self.authenticator = Authenticator(
            self.api_keys, demo_key_hint=self.backend.name != "memory"
        )
        # Open streams by key id; the watch ends those of revoked keys (server.revocation).
        self.revocation = RevocationWatch(
            OpenStreams(), self.api_keys, interval_s=settings.revocation_check_interval
        )
        # Open server-streaming calls per tenant (the edge caps them).
        self.stream_slots = StreamSlots(settings.max_streams_per_tenant)
        self.ws_bridge = WebSocketBridge(
            self.services.notices,
            websocket_identity(self.authenticator),
            max_message_bytes=settings.max_message_bytes,
        )
        self.health_servicer = HealthServicer()
        # Each health probe also checks the backend's instance marker (server.data_loss).
        self.data_loss = DataLossWatch(
            self.backend.instance,
            self._recover_from_data_loss,
            on_failover=self._failed_over,
        )
        self.health = HealthMonitor(
            self.health_servicer,
            SERVICE_NAMES,
            self.data_loss.probe,
            interval_s=settings.health_interval,
            events_problem=self.backend.events_problem,
        )
        # Configured downstream addresses that cannot be reached: logged and in health.
        self.downstream_watch: DownstreamWatch | None = None
        if settings.downstream_check_interval > 0:
            self.downstream_watch = DownstreamWatch(
                self.health_servicer,
                watched_services(settings),
                interval_s=settings.downstream_check_interval,
                connect_timeout_s=min(settings.downstream_timeout, 3.0),
            )
        # Tasks by state and queue depth, read from the backend while /metrics is served.
        self.sampler = MetricsSampler(
            self.metrics,
            self.backend.jobs,
            {BATCH_QUEUE: self.services.batch_queue, CHAT_QUEUE: self.services.chat_queue},
            interval_s=settings.metrics_sample_interval,
        )
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self._stopped = asyncio.Event()

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
        """grpc interceptors: OpenTelemetry's when tracing is enabled, else none. They run
        outside the edge (``edge()``), which every registered method handler is wrapped in."""
        chain: list[grpc.aio.ServerInterceptor] = []  # type: ignore[type-arg]
        if self.tracing.enabled:
            tracing = tracing_interceptor(self.tracer_provider)
            if tracing is not None:
                chain.append(tracing)
        return chain

    def edge(self) -> Edge | None:
        """The edge chain (server.edge): request context, metrics, identity and rate limits,
        in that order, in one wrapper per method: metrics outside identity and limits so their
        refusals are counted, limits after identity because they need the caller. None serves
        the services bare (benchmarks compare against that)."""
        settings = self.settings
        limits = EdgeLimits(
            self.backend.rate_limiter,
            settings.rate_limit_rules(),
            self.stream_slots,
            self.metrics,
            rate_enabled=settings.rate_limit_enabled,
        )
        return Edge(
            self.metrics,
            self.authenticator,
            limits,
            trailing_request_ids=settings.unary_request_id == "trailing",
            open_streams=self.revocation.streams,
            auth_failures=AuthFailures(settings.auth_failure_limit, settings.auth_failure_window),
            server_spans=self.tracing.enabled,
        )

    def operator_queries(self) -> OperatorQueries:
        """The admin API's cross-tenant reads and repairs over this process's backend."""
        services = self.services
        return OperatorQueries(
            jobs=self.backend.jobs,
            usage=self.backend.usage,
            queues={BATCH_QUEUE: services.batch_queue, CHAT_QUEUE: services.chat_queue},
            sessions=services.sessions,
            events=self.backend.events,
            batches=services.batches,
            keys=self.backend.api_keys,
        )

    def _build(self) -> grpc.aio.Server:
        settings = self.settings
        server = grpc.aio.server(
            interceptors=self.interceptors(),
            options=server_options(settings),
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        edge = self.edge()
        # Services are added through the registrar, which makes every method decode its own
        # requests (server.decoding) and wraps it in the edge.
        target: Any = EdgeRegistrar(server, edge)
        session_pb2_grpc.add_SessionServiceServicer_to_server(
            SessionServicer(self.services.sessions), target
        )
        add_chat_service(ChatServicer(self.services.chat), target)
        batch_pb2_grpc.add_BatchServiceServicer_to_server(
            BatchServicer(self.services.batches), target
        )
        task_update_pb2_grpc.add_TaskUpdateServiceServicer_to_server(
            TaskUpdateServicer(self.services.notices), target
        )
        queries = AdminQueries(self.backend.jobs, self.backend.usage, settings.budget_rules())
        admin_pb2_grpc.add_AdminServiceServicer_to_server(
            OperatorAdminServicer(
                self.api_keys, queries, self.services.agents_directory, self.operator_queries()
            ),
            target,
        )
        platform_pb2_grpc.add_PlatformServiceServicer_to_server(
            PlatformServicer(self.services.internal_calls), target
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health_servicer, target)
        if self.extra_handlers:
            target.add_generic_rpc_handlers(self.extra_handlers)
        # What reflection.enable_server_reflection does for an aio server, through the edge.
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            AioReflectionServicer(
                (
                    *SERVICE_NAMES,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                )
            ),
            target,
        )
        return server

    async def start(self) -> None:
        """Bind, probe the backend once, start serving and the health watcher."""
        self.check_addresses()
        if self.backend.name == "memory":
            log.warning(
                "no REDIS_URL set: using the in-memory registry (single process only; "
                "state is not shared between replicas and is lost on restart)"
            )
        self._server = self._build()
        credentials = server_credentials(self.settings)
        address = self.settings.listen_address
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, credentials)
        except RuntimeError:  # grpc: "Failed to bind to address ..."
            self.port = 0
        if self.port == 0:
            raise ListenError(f"cannot listen on {address} (ORCH_LISTEN_ADDRESS)")
        if await self.health.check_once():
            await self._seed_keys()
            try:
                await warn_without_persistence(self.backend.instance)
            except Unavailable as exc:
                log.warning("could not read Redis' persistence settings: %s", exc)
        elif self.settings.bootstrap_admin_key:
            log.warning("backend unavailable at start: the bootstrap admin key was not stored")
        if self.settings.ws_address:
            await self.ws_bridge.start(
                self.settings.ws_address, reuse_port=self.settings.so_reuseport
            )
        if self.settings.metrics_address:
            self.metrics_http = MetricsHttpServer(self.metrics, self.settings.metrics_address)
            await self.metrics_http.start()
            self.sampler.start()
        metrics_module.install(self.metrics)
        await self._server.start()
        self.health.start()
        if self.downstream_watch is not None:
            self.downstream_watch.start()
        self.services.reaper.start()
        self.services.handoffs.start()
        self.revocation.start()
        self.services.expirer.start()
        self.services.batch_repair.start()
        if self.settings.batch_worker_enabled:
            self.workers.start_batch_worker()
        if self.settings.chat_worker_enabled:
            self.workers.start_chat_worker()
        log.info(
            "serving on %s (port %d, %s) with the %s registry, on the %s event loop",
            self.settings.listen_address,
            self.port,
            transport_name(self.settings),
            self.backend.name,
            loop_name(),
        )

    def check_addresses(self) -> None:
        """ListenError, naming the setting, if an address this server listens on is taken
        (the gRPC port is shared on purpose with ORCH_SO_REUSEPORT: not checked then)."""
        settings = self.settings
        for address, setting in (
            ("" if settings.so_reuseport else settings.listen_address, "ORCH_LISTEN_ADDRESS"),
            (settings.ws_address, "ORCH_WS_ADDRESS"),
            (settings.metrics_address, "ORCH_METRICS_ADDRESS"),
        ):
            if address:
                ensure_free(address, setting)

    async def _seed_keys(self) -> None:
        in_memory = self.backend.name == "memory"
        await seed_keys(self.settings, self.api_keys, in_memory=in_memory)
        await warn_without_keys(self.settings, self.api_keys, in_memory=in_memory)

    async def _recover_from_data_loss(self) -> None:
        """The backend came back empty: store again what start-up stored, and let every
        stream of this process check that its session and job still exist."""
        await self._seed_keys()
        self.backend.fanout.recheck_all()

    def _failed_over(self) -> None:
        """The cluster's masters changed: every stream of this process checks what it
        follows, and a pass settles the batch items whose result the failover lost."""
        self.backend.fanout.recheck_all()
        self.services.batch_repair.request()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: health NOT_SERVING, refuse new calls, let in-flight calls finish
        within the grace period, end streams, then close the backend."""
        if self._server is None or self._stopped.is_set():
            return
        grace = self.settings.shutdown_grace if grace is None else grace
        log.info("shutting down (grace %.1fs)", grace)
        await self.health.shutdown()
        if self.downstream_watch is not None:
            await self.downstream_watch.aclose()
        await self.sampler.stop()
        await self.services.handoffs.stop()
        # Batch items in flight get the grace period before their streams are ended below.
        await self.workers.stop()
        await self.services.expirer.stop()
        await self.services.batch_repair.stop()
        await self.services.reaper.stop()
        await self.revocation.stop()
        await self.ws_bridge.stop()
        # Client streams end once they have sent what they have; unary calls get the grace.
        self.backend.fanout.close_all()
        await self._server.stop(grace)
        # Hand-offs in progress finish (bounded); the rest is redone by another process.
        await self.services.chat.drain(grace)
        await self.dispatcher.aclose()
        if self._platform_clients is not None:
            await self._platform_clients.aclose()
        # Closes the work queues and the connection pools too.
        await self.backend.aclose()
        if self.metrics_http is not None:
            await self.metrics_http.stop()
        metrics_module.uninstall(self.metrics)
        self._stopped.set()
        log.info("stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def serve_until_signalled(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""
        await self.start()
        settle_heap(self.settings.gc_young_threshold)
        await wait_for_stop_signal()
        await self.stop()

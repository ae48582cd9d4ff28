"""Optional OpenTelemetry tracing (the ``tracing`` extra), switched on by ORCH_OTEL_ENABLED.

When enabled, OpenTelemetry's grpc.aio server interceptor goes first in the chain: it starts a
server span per RPC whose parent is the caller's ``traceparent`` (W3C propagation). The edge
(server.edge) then binds that server span's traceparent as the call's trace context, so
everything the call causes nests under it: the client span of every downstream call
(clients.downstream.ServiceCaller), and the job it accepts, which stores it
(``NewJob.traceparent``). Work done for the job later, in another task or process (the hand-off
and its recovery, a queued job's turn, each notice from its service, the finalize) opens a span
in that stored trace with :meth:`OtelTracing.job_span` (domain.ports.tracing), so one trace shows
the whole plan. Handlers doing work for a job (the internal platform API) call the same
``job_span(name, job.traceparent)`` on the ``Tracing`` they are given.

The interceptor only wraps server-streaming handlers written as async generators (the edge's
wrapper is one); a new server-streaming RPC must be written as one too.

Spans go to the given tracer provider, else the global one. ``configure_tracer_provider``
(called by ``orchestrator serve``) installs the SDK provider with an OTLP exporter when
``opentelemetry-exporter-otlp`` is installed (configured by the standard OTEL_EXPORTER_OTLP_*
variables); a provider set up by the deployment (e.g. ``opentelemetry-instrument``) is left
alone. Tracing off (the default), :data:`domain.ports.tracing.NO_TRACING` stands in: no span is
made, and the caller's traceparent (and a job's stored one) is still passed on.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from domain.ports.tracing import NO_TRACING, SpanKind, SpanSpec, Tracing

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Link, Span

log = logging.getLogger(__name__)


def tracing_interceptor(tracer_provider: Any = None) -> Any:
    """OpenTelemetry's aio server interceptor, or None when OpenTelemetry is not installed."""
    try:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor
    except ImportError:
        log.warning("ORCH_OTEL_ENABLED is set but OpenTelemetry is not installed: no tracing")
        return None
    # Health probes would only add noise; and grpc's health Watch is a coroutine stream that
    # OpenTelemetry's stream wrapper cannot iterate.
    return aio_server_interceptor(  # type: ignore[no-untyped-call]
        tracer_provider=tracer_provider, filter_=_not_health
    )


def _not_health(details: Any) -> bool:
    return not str(details.method).startswith("/grpc.health.v1.")


def configure_tracer_provider(service_name: str = "agent-orchestrator") -> None:
    """Install an SDK tracer provider exporting over OTLP, unless one is already set."""
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        return
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return
    try:
        exporter_module = importlib.import_module(
            "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"
        )
    except ImportError:
        log.warning(
            "tracing enabled without an exporter: install opentelemetry-exporter-otlp or run "
            "under opentelemetry-instrument; trace context is still propagated"
        )
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter_module.OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


TRACER_NAME = "agent-orchestrator"


def tracing_for(enabled: bool, tracer_provider: Any = None) -> Tracing:
    """OpenTelemetry spans when ``enabled`` and OpenTelemetry is installed, else none."""
    if not enabled:
        return NO_TRACING
    try:
        return OtelTracing(tracer_provider)
    except ImportError:
        log.warning("ORCH_OTEL_ENABLED is set but OpenTelemetry is not installed: no tracing")
        return NO_TRACING


def traceparent_of(span: Span) -> str | None:
    """The W3C traceparent of ``span`` (None when its context is invalid)."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def current_traceparent() -> str | None:
    """The traceparent of the current OpenTelemetry span (None: no span, or no OpenTelemetry)."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return traceparent_of(trace.get_current_span())


class OtelTracing(Tracing):
    """domain.ports.tracing.Tracing on OpenTelemetry (see the module docstring)."""

    def __init__(self, tracer_provider: Any = None) -> None:
        from opentelemetry import trace

        self._trace = trace
        self._tracer = trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)
        self._kinds = {
            SpanKind.INTERNAL: trace.SpanKind.INTERNAL,
            SpanKind.CLIENT: trace.SpanKind.CLIENT,
            SpanKind.CONSUMER: trace.SpanKind.CONSUMER,
        }

    @property
    def enabled(self) -> bool:
        return True

    @contextmanager
    def open_span(self, spec: SpanSpec) -> Iterator[str | None]:
        parent, links = self._parent(spec.traceparent)
        span = self._tracer.start_span(
            spec.name,
            context=parent,
            kind=self._kinds[spec.kind],
            attributes=spec.attributes,
            links=links,
            start_time=spec.start_ns,
        )
        with self._trace.use_span(
            span, end_on_exit=True, record_exception=True, set_status_on_exception=True
        ):
            yield traceparent_of(span)

    def _parent(self, traceparent: str | None) -> tuple[Context | None, list[Link]]:
        """The parent of a new span in the trace of ``traceparent`` (None: the current
        context) and its links (see Tracing.job_span)."""
        trace = self._trace
        current = trace.get_current_span().get_span_context()
        remote = _span_context(traceparent)
        if remote is None or (current.is_valid and current.trace_id == remote.trace_id):
            return None, []
        links = [trace.Link(current)] if current.is_valid else []
        return trace.set_span_in_context(trace.NonRecordingSpan(remote)), links


def _span_context(traceparent: str | None) -> Any:
    """The remote span context of a version-00 traceparent (as handlers.request_context
    keeps them), or None."""
    if not traceparent or len(traceparent) != 55:
        return None
    from opentelemetry.trace import SpanContext, TraceFlags

    try:
        trace_id = int(traceparent[3:35], 16)
        span_id = int(traceparent[36:52], 16)
        flags = int(traceparent[53:55], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))

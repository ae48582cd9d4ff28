"""Optional OpenTelemetry tracing (the ``tracing`` extra), switched on by ORCH_OTEL_ENABLED.

When enabled, OpenTelemetry's grpc.aio server interceptor goes first in the chain: it starts a
server span per RPC whose parent is the caller's ``traceparent`` (W3C propagation). Spans go to
the global tracer provider. ``configure_tracer_provider`` (called by ``orchestrator serve``)
installs the SDK provider with an OTLP exporter when ``opentelemetry-exporter-otlp`` is
installed (configured by the standard OTEL_EXPORTER_OTLP_* variables); a provider set up by the
deployment (e.g. ``opentelemetry-instrument``) is left alone.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

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

"""``Tracing.job_span``, the one helper for "a span in this job's trace" (server.tracing): its
parent is the current span when that is in the job's trace already, else the job's stored
trace context (linked to the current span); tracing off it passes the trace context through."""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind as OtelKind
from opentelemetry.trace import StatusCode

from domain.ports.tracing import NO_TRACING, SpanKind
from handlers.request_context import parse_traceparent
from server.tracing import OtelTracing, tracing_for

JOB_TRACE = "0af7651916cd43dd8448eb211c80319c"
JOB_SPAN = "b7ad6b7169203331"
JOB = f"00-{JOB_TRACE}-{JOB_SPAN}-01"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(exporter: InMemorySpanExporter) -> OtelTracing:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return OtelTracing(provider)


def finished(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    (span,) = [span for span in exporter.get_finished_spans() if span.name == name]
    return span


def test_without_a_current_span_the_span_is_a_child_of_the_jobs_trace_context(
    tracing: OtelTracing, exporter: InMemorySpanExporter
) -> None:
    with tracing.job_span("finalize job", JOB) as traceparent:
        pass
    span = finished(exporter, "finalize job")
    assert span.context is not None and span.parent is not None
    assert format(span.context.trace_id, "032x") == JOB_TRACE
    assert format(span.parent.span_id, "016x") == JOB_SPAN
    assert not span.links
    # It yields its own traceparent, to pass on to the calls it makes.
    assert traceparent == parse_traceparent(traceparent)
    own_id = format(span.context.span_id, "016x")
    assert traceparent is not None and traceparent.split("-")[2] == own_id


def test_inside_a_span_of_the_jobs_trace_the_span_nests_under_it(
    tracing: OtelTracing, exporter: InMemorySpanExporter
) -> None:
    with (
        tracing.job_span("chat process", JOB, kind=SpanKind.CONSUMER),
        tracing.job_span("hand over job", JOB),
    ):
        pass
    worker, hand_off = finished(exporter, "chat process"), finished(exporter, "hand over job")
    assert worker.kind is OtelKind.CONSUMER
    assert worker.context is not None and hand_off.parent is not None
    assert hand_off.parent.span_id == worker.context.span_id


def test_inside_a_span_of_another_trace_the_span_joins_the_job_and_links_to_it(
    tracing: OtelTracing, exporter: InMemorySpanExporter
) -> None:
    with (
        tracing.job_span("/internal.v1.PlatformService/Complete", None),
        tracing.job_span("internal call", JOB),
    ):
        pass
    rpc, call = (
        finished(exporter, "/internal.v1.PlatformService/Complete"),
        finished(exporter, "internal call"),
    )
    assert call.context is not None and call.parent is not None and rpc.context is not None
    assert format(call.context.trace_id, "032x") == JOB_TRACE
    assert format(call.parent.span_id, "016x") == JOB_SPAN
    assert [link.context.span_id for link in call.links] == [rpc.context.span_id]


def test_without_a_trace_context_the_span_starts_a_trace(
    tracing: OtelTracing, exporter: InMemorySpanExporter
) -> None:
    with tracing.job_span("hand over job", None) as traceparent:
        pass
    span = finished(exporter, "hand over job")
    assert span.parent is None and traceparent is not None


def test_an_error_leaving_the_block_is_recorded_on_the_span(
    tracing: OtelTracing, exporter: InMemorySpanExporter
) -> None:
    with pytest.raises(ValueError, match="boom"), tracing.job_span("hand over job", JOB):
        raise ValueError("boom")
    span = finished(exporter, "hand over job")
    assert span.status.status_code is StatusCode.ERROR
    assert [event.name for event in span.events] == ["exception"]


def test_tracing_off_makes_no_span_and_passes_the_trace_context_on() -> None:
    assert tracing_for(False) is NO_TRACING
    with NO_TRACING.job_span("hand over job", JOB) as traceparent:
        assert traceparent == JOB
    with NO_TRACING.record_span("notice completed", None, 0) as traceparent:
        assert traceparent is None


def test_a_later_versions_traceparent_is_kept_as_version_00() -> None:
    later = f"01-{JOB_TRACE}-{JOB_SPAN}-01-what-comes-next"
    assert parse_traceparent(later) == JOB

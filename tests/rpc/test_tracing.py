"""Optional OpenTelemetry tracing: a server span per RPC, parented by the caller's traceparent."""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from orchestrator.v1 import session_pb2, session_pb2_grpc
from tests.support.probe import Probe, watch_method
from tests.support.servers import running_server, tenant, test_settings

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


async def test_unary_and_streaming_calls_make_server_spans_under_the_incoming_trace() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    probe = Probe()
    probe.release.set()
    settings = test_settings(None, otel_enabled=True)
    async with running_server(
        settings, tracer_provider=provider, extra_handlers=[probe.handler()]
    ) as server:
        traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"
        await session_pb2_grpc.SessionServiceStub(server.channel).ListSessions(
            session_pb2.ListSessionsRequest(), metadata=tenant("acme", traceparent=traceparent)
        )
        stream = watch_method(server.channel)(b"", metadata=tenant("acme"))
        assert [message async for message in stream] == [b"open"]
    provider.shutdown()

    spans = {span.name: span for span in exporter.get_finished_spans()}
    unary = spans["/orchestrator.v1.SessionService/ListSessions"]
    streaming = spans["/orchestrator.v1.TestProbe/Watch"]
    assert unary.kind is SpanKind.SERVER and streaming.kind is SpanKind.SERVER
    assert format(unary.context.trace_id, "032x") == TRACE_ID
    assert unary.parent is not None and format(unary.parent.span_id, "016x") == PARENT_ID
    assert streaming.parent is None  # no incoming trace: a new root
    assert probe.seen[-1].request_id  # the edge chain ran inside the span

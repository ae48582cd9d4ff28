"""Traceability end to end (issue 14, item 5), on both backends: with tracing on, a chat with
the reference tool agent is ONE trace exported by the in-memory span exporter. Its root is the
SendMessage server span; every downstream call (a client span), the hand-off, each notice the
agent's service sent about the job and the finalize are its descendants, and the service got
the client span of its own call as its parent. A background message's trace goes through the
``chat`` work queue: the worker's span is a child of the call that accepted the job, and the
hand-off and its calls nest under it; a batch item's run nests under the ``batch`` worker's
span, in the trace of the call that submitted the batch."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from domain.ids import new_id
from domain.jobs import IfBusy, NewJob, StartedJob
from domain.models import Service, WorkKind
from orchestrator.v1 import (
    batch_pb2,
    batch_pb2_grpc,
    chat_pb2,
    chat_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
)
from reference.app import ReferenceServices
from reference.config import ReferenceConfig
from tests.support.batches import llm_item, read_results
from tests.support.flow import kind_of, read_to_end
from tests.support.redis_process import free_port
from tests.support.servers import RunningServer, running_server, service, tenant, test_settings

TIMEOUT_S = 20.0
# The reference Agent Execution calls its calculator and clock tools for this.
QUESTION = "what is 12*7 and what time is it"
SEND = "/orchestrator.v1.ChatService/SendMessage"
LIST_HISTORY = "conversation.v1.ConversationService/ListHistory"
RESOLVE_TOOLS = "tools.v1.ToolRegistryService/ResolveTools"
START_RUN = "agent_execution.v1.AgentExecutionService/StartRun"
APPEND_TURNS = "conversation.v1.ConversationService/AppendTurns"
# The agent's LLM call goes through the internal API and runs as a child job at Query.
STREAM_COMPLETE = "/orchestrator.internal.v1.PlatformService/StreamComplete"
INTERNAL_CALL = "internal call"
SUBMIT_QUERY = "query.v1.QueryService/SubmitQuery"


@dataclass
class Traced:
    """A finished run: the chat's events, the exported spans and what the reference saw."""

    events: list[Any]
    spans: list[ReadableSpan]
    seen_traceparents: dict[str, str | None]  # submit method -> the traceparent it got

    def trace_of(self, root: ReadableSpan) -> list[ReadableSpan]:
        trace_id = _trace_id(root)
        return [span for span in self.spans if _trace_id(span) == trace_id]

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.spans if span.name == name]


def _trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.trace_id)


def _span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def _traceparent(span: ReadableSpan) -> str:
    assert span.context is not None
    context = span.context
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def parent_of(span: ReadableSpan, spans: Sequence[ReadableSpan]) -> ReadableSpan | None:
    if span.parent is None:
        return None
    (parent,) = [s for s in spans if _span_id(s) == span.parent.span_id]
    return parent


def ancestors(span: ReadableSpan, spans: Sequence[ReadableSpan]) -> list[str]:
    """The names of the span's ancestors, nearest first (fails on a parent not exported)."""
    names = []
    parent = parent_of(span, spans)
    while parent is not None:
        names.append(parent.name)
        parent = parent_of(parent, spans)
    return names


Action = Callable[[RunningServer], Awaitable[list[Any]]]


async def traced(backend_url: str | None, action: Action, **overrides: Any) -> Traced:
    """``action`` against an orchestrator with tracing on (plans, the chat and batch workers,
    the reference services in this process); the spans once the server stopped (so every
    span of its jobs has ended)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    reference_address = f"127.0.0.1:{free_port()}"
    orchestrator_address = f"127.0.0.1:{free_port()}"
    settings = test_settings(
        backend_url,
        listen_address=orchestrator_address,
        query_service_address=reference_address,
        embedding_service_address=reference_address,
        otel_enabled=True,
        plans=True,
        agent_check=True,
        chat_worker_enabled=True,
        batch_worker_enabled=True,
        **overrides,
    )
    reference = ReferenceServices(
        ReferenceConfig(
            listen_address=reference_address,
            orchestrator_address=orchestrator_address,
            step_delay_s=0.0,
            publish_metadata=service(),
        )
    )
    async with running_server(settings, tracer_provider=provider) as running:
        await reference.start()
        try:
            events = await action(running)
        finally:
            await reference.stop()
    provider.shutdown()
    seen = {entry.method: entry.traceparent for entry in reference.seen}
    return Traced(events, list(exporter.get_finished_spans()), seen)


def tool_agent_chat(*, background: bool) -> Action:
    """A message to the reference tool agent on a new session, read to its final event."""

    async def chat(running: RunningServer) -> list[Any]:
        channel = running.channel
        created = await session_pb2_grpc.SessionServiceStub(channel).CreateSession(
            session_pb2.CreateSessionRequest(agent_id="tool-bot"),
            metadata=tenant("demo"),
            timeout=TIMEOUT_S,
        )
        call = chat_pb2_grpc.ChatServiceStub(channel).SendMessage(
            chat_pb2.SendMessageRequest(
                session_id=created.session.session_id, content=QUESTION, background=background
            ),
            metadata=tenant("demo"),
            timeout=TIMEOUT_S,
        )
        return await read_to_end(call)

    return chat


async def one_item_batch(running: RunningServer) -> list[Any]:
    """A batch of one LLM query, followed to its result."""
    stub = batch_pb2_grpc.BatchServiceStub(running.channel)
    reply = await stub.SubmitBatch(
        batch_pb2.SubmitBatchRequest(items=[llm_item("only", "What is RAG?")]),
        metadata=tenant("demo"),
        timeout=TIMEOUT_S,
    )
    results = stub.StreamBatchResults(
        batch_pb2.StreamBatchResultsRequest(batch_id=reply.batch.batch_id),
        metadata=tenant("demo"),
        timeout=TIMEOUT_S,
    )
    return await read_results(results, count=1, timeout_s=TIMEOUT_S)


@pytest.fixture
async def foreground(backend_url: str | None) -> Traced:
    return await traced(backend_url, tool_agent_chat(background=False))


@pytest.fixture
async def background(backend_url: str | None) -> Traced:
    return await traced(backend_url, tool_agent_chat(background=True))


# The trace context a job was accepted under by a process that died before handing it over.
DEAD_PROCESS_TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def job_left_by_a_dead_process(running: RunningServer) -> list[Any]:
    """A job started in the store under DEAD_PROCESS_TRACE and never handed over (as a
    process that died right after accepting it leaves it), followed on its session until the
    hand-off recovery of this server has had it done."""
    created = await session_pb2_grpc.SessionServiceStub(running.channel).CreateSession(
        session_pb2.CreateSessionRequest(agent_id="support-bot"),
        metadata=tenant("demo"),
        timeout=TIMEOUT_S,
    )
    session_id = created.session.session_id
    job = NewJob(
        job_id=new_id(),
        session_id=session_id,
        agent_id="support-bot",
        service=Service.QUERY,
        kind=WorkKind.LLM_QUERY,
        content="What is RAG?",
        request_id="dead-process",
        traceparent=DEAD_PROCESS_TRACE,
    )
    server = running.server
    started = await server.backend.jobs.start_job(
        "demo", job, server.services.limits, if_busy=IfBusy.RUN
    )
    assert isinstance(started, StartedJob)
    call = chat_pb2_grpc.ChatServiceStub(running.channel).StreamSession(
        chat_pb2.StreamSessionRequest(session_id=session_id),
        metadata=tenant("demo"),
        timeout=TIMEOUT_S,
    )
    events: list[Any] = []
    async for message in call:
        events.append(message.event)
        if kind_of(message.event) in ("completed", "failed", "timed_out", "cancelled"):
            call.cancel()
            break
    return events


def job_trace(traced: Traced) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The SendMessage server span and every span of its trace; the chat completed."""
    assert kind_of(traced.events[-1]) == "completed", traced.events[-1]
    (root,) = traced.named(SEND)
    return root, traced.trace_of(root)


async def test_a_tool_agent_chat_is_one_trace_with_every_call_and_notice_under_its_root(
    foreground: Traced,
) -> None:
    root, spans = job_trace(foreground)
    assert root.kind is SpanKind.SERVER and root.parent is None
    # One root: every other span of the trace hangs under it (each parent was exported).
    assert [span for span in spans if span.parent is None] == [root]
    for span in spans:
        if span is not root:
            assert ancestors(span, spans)[-1] == SEND, span.name
    names = [span.name for span in spans]
    for call in (LIST_HISTORY, RESOLVE_TOOLS, START_RUN, APPEND_TURNS):
        assert names.count(call) == 1, (call, names)
    # Every downstream call of the run is a client span in this trace (the session's agent
    # check, made by CreateSession, is in that call's own trace).
    clients = [span for span in foreground.spans if span.kind is SpanKind.CLIENT]
    assert {span.name for span in clients if span not in spans} <= {
        "agents.v1.AgentManagementService/GetAgent"
    }
    # Each notice the agent's service sent about the job was handled in the job's trace.
    notices = [span for span in foreground.spans if span.name.startswith("notice ")]
    assert {"notice tool_call", "notice delta", "notice completed"} <= {s.name for s in notices}
    assert all(span in spans for span in notices)


async def test_the_calls_nest_under_the_hand_off_and_the_finalize_under_the_completed_notice(
    foreground: Traced,
) -> None:
    _, spans = job_trace(foreground)
    (start_run,) = [span for span in spans if span.name == START_RUN]
    assert ancestors(start_run, spans) == ["hand over job", SEND]
    (append,) = [span for span in spans if span.name == APPEND_TURNS]
    assert ancestors(append, spans) == ["finalize job", "notice completed", SEND]
    # The Agent Execution service was handed the StartRun client span as its parent.
    assert foreground.seen_traceparents["StartRun"] == _traceparent(start_run)


def job_id_of(span: ReadableSpan) -> object:
    return (span.attributes or {}).get("orchestrator.job_id")


async def test_the_agents_internal_call_and_its_child_job_nest_under_the_run_in_one_trace(
    foreground: Traced,
) -> None:
    root, spans = job_trace(foreground)
    assert [span for span in spans if span.parent is None] == [root]
    # The Agent Execution service called the internal API in the trace it was handed.
    (server_call,) = [span for span in spans if span.name == STREAM_COMPLETE]
    assert ancestors(server_call, spans) == [START_RUN, "hand over job", SEND]
    (internal,) = foreground.named(INTERNAL_CALL)
    assert internal in spans and parent_of(internal, spans) is server_call
    (run_hand_off,) = [s for s in spans if s.name == "hand over job" and s.parent == root.context]
    assert job_id_of(internal) == job_id_of(run_hand_off)  # attributed to the agent's job
    # The child job (its hand-off, its Query call, the notices about it) nests under the call.
    (submit,) = [span for span in spans if span.name == SUBMIT_QUERY]
    assert ancestors(submit, spans)[:3] == ["hand over job", INTERNAL_CALL, STREAM_COMPLETE]
    child_id = job_id_of(parent_of(submit, spans))  # type: ignore[arg-type]
    assert child_id != job_id_of(internal)
    assert foreground.seen_traceparents["SubmitQuery"] == _traceparent(submit)
    child_notices = [
        span
        for span in foreground.spans
        if span.name.startswith("notice ") and job_id_of(span) == child_id
    ]
    assert {"notice delta", "notice completed"} <= {span.name for span in child_notices}
    for span in child_notices:
        assert span in spans and ancestors(span, spans)[0] == INTERNAL_CALL, span.name


async def test_a_background_job_is_traced_through_the_work_queue_worker(
    background: Traced,
) -> None:
    root, spans = job_trace(background)
    assert [span for span in spans if span.parent is None] == [root]
    (worker,) = [span for span in spans if span.name == "chat process"]
    assert worker.kind is SpanKind.CONSUMER
    assert ancestors(worker, spans) == [SEND]
    for call in (LIST_HISTORY, RESOLVE_TOOLS, START_RUN):
        (span,) = [span for span in spans if span.name == call]
        assert ancestors(span, spans) == ["hand over job", "chat process", SEND]
    assert any(span.name == "notice completed" for span in spans)


async def test_a_batch_items_job_is_traced_under_the_batch_worker_in_the_submitting_trace(
    backend_url: str | None,
) -> None:
    batch = await traced(backend_url, one_item_batch)
    (result,) = batch.events
    assert result.state == batch_pb2.BATCH_ITEM_STATE_COMPLETED, result
    (root,) = batch.named("/orchestrator.v1.BatchService/SubmitBatch")
    spans = batch.trace_of(root)
    (worker,) = [span for span in spans if span.name == "batch process"]
    assert worker.kind is SpanKind.CONSUMER
    assert ancestors(worker, spans) == [root.name]
    (submit,) = [span for span in spans if span.name == "query.v1.QueryService/SubmitQuery"]
    assert ancestors(submit, spans) == ["hand over job", "batch process", root.name]
    assert any(span.name == "notice completed" for span in spans)


async def test_a_hand_off_redone_by_another_process_continues_the_jobs_trace(
    backend_url: str | None,
) -> None:
    recovered = await traced(backend_url, job_left_by_a_dead_process, handoff_grace=0.3)
    assert kind_of(recovered.events[-1]) == "completed", recovered.events[-1]
    trace_id, parent_id = (int(part, 16) for part in DEAD_PROCESS_TRACE.split("-")[1:3])
    spans = [span for span in recovered.spans if _trace_id(span) == trace_id]
    (hand_off,) = [span for span in spans if span.name == "hand over job"]
    # Parented on the trace context stored with the job (the dead process's span).
    assert hand_off.parent is not None and hand_off.parent.span_id == parent_id
    assert hand_off.attributes is not None and hand_off.attributes["orchestrator.attempt"] == 2
    (submit,) = [span for span in spans if span.name == "query.v1.QueryService/SubmitQuery"]
    assert parent_of(submit, spans) is hand_off
    assert any(span.name == "notice completed" for span in spans)

"""The whole flow with the reference Query and Embedding services over real gRPC: the
orchestrator delegates, the services report back through PublishUpdates, the client streams."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from orchestrator.v1 import chat_pb2, common_pb2
from reference.app import ReferenceServices
from reference.config import ReferenceConfig
from tests.support.downstream import RecordingDispatcher
from tests.support.flow import Flow, kind_of, read_to_end
from tests.support.redis_process import free_port
from tests.support.servers import running_server, service, tenant, test_settings


@dataclass
class Platform:
    flow: Flow
    reference: ReferenceServices


@pytest.fixture
async def platform(backend_url: str | None) -> AsyncIterator[Platform]:
    orchestrator_port, reference_port = free_port(), free_port()
    settings = test_settings(
        backend_url,
        listen_address=f"127.0.0.1:{orchestrator_port}",
        query_service_address=f"127.0.0.1:{reference_port}",
        embedding_service_address=f"127.0.0.1:{reference_port}",
        downstream_timeout=2.0,
    )
    reference = ReferenceServices(
        ReferenceConfig(
            listen_address=f"127.0.0.1:{reference_port}",
            orchestrator_address=f"127.0.0.1:{orchestrator_port}",
            step_delay_s=0.0,
            publish_metadata=service(),
        )
    )
    async with running_server(settings) as running:
        await reference.start()
        try:
            yield Platform(Flow(running, RecordingDispatcher()), reference)
        finally:
            await reference.stop()


async def test_a_query_streams_accepted_deltas_and_completed(platform: Platform) -> None:
    flow = platform.flow
    session_id = await flow.new_session()
    events = await read_to_end(flow.send(session_id, "What is RAG?"))
    kinds = [kind_of(e) for e in events]
    assert kinds[0] == "accepted" and kinds[-1] == "completed"
    assert "delta" in kinds and "progress" in kinds
    answer = "".join(e.delta.text for e in events if kind_of(e) == "delta")
    assert answer == events[-1].completed.result.text
    assert "What is RAG?" in answer
    assert events[-1].completed.usage.total_tokens > 0
    session = await flow.get_session(session_id)
    assert session.token_usage.total_tokens == events[-1].completed.usage.total_tokens
    (seen,) = [s for s in platform.reference.seen if s.job_id == events[0].job_id]
    assert seen.tenant_id == "acme"


async def test_an_embedding_returns_vectors(platform: Platform) -> None:
    flow = platform.flow
    session_id = await flow.new_session()
    events = await read_to_end(
        flow.send(session_id, "embed this", kind=common_pb2.WORK_KIND_EMBEDDING)
    )
    assert kind_of(events[-1]) == "completed"
    (vector,) = events[-1].completed.result.embeddings
    assert len(vector.values) == 8


async def test_a_downstream_that_is_down_fails_the_job_quickly(platform: Platform) -> None:
    await platform.reference.stop()
    flow = platform.flow
    session_id = await flow.new_session()
    events = await read_to_end(flow.send(session_id, "anyone there?"), timeout_s=8.0)
    assert [kind_of(e) for e in events] == ["accepted", "failed"]
    assert events[1].failed.error.code == "downstream_unavailable"


@pytest.mark.parametrize("kind", [common_pb2.WORK_KIND_LLM_QUERY, common_pb2.WORK_KIND_EMBEDDING])
async def test_the_service_sees_the_callers_request_id_and_traceparent(
    platform: Platform, kind: int
) -> None:
    flow = platform.flow
    session_id = await flow.new_session()
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    call = flow.chat.SendMessage(
        chat_pb2.SendMessageRequest(session_id=session_id, content="trace me", kind=kind),  # type: ignore[arg-type]
        metadata=tenant("acme", **{"x-request-id": "req-e2e-42", "traceparent": traceparent}),
        timeout=10,
    )
    events = await read_to_end(call)
    assert kind_of(events[-1]) == "completed"
    assert {e.request_id for e in events} == {"req-e2e-42"}
    (seen,) = [s for s in platform.reference.seen if s.job_id == events[0].job_id]
    assert (seen.tenant_id, seen.request_id, seen.traceparent) == (
        "acme",
        "req-e2e-42",
        traceparent,
    )


async def test_without_headers_the_service_sees_the_generated_request_id(
    platform: Platform,
) -> None:
    flow = platform.flow
    session_id = await flow.new_session()
    call = flow.send(session_id, "no headers")
    initial = dict(await call.initial_metadata())
    events = await read_to_end(call)
    (seen,) = [s for s in platform.reference.seen if s.job_id == events[0].job_id]
    assert seen.request_id == initial["x-request-id"] == events[0].request_id
    assert seen.traceparent is None


async def test_an_agent_change_reaches_the_orchestrator_as_an_accepted_notice(
    platform: Platform,
) -> None:
    reference = platform.reference
    reference.agents.update_agent("demo", "tool-bot", max_tool_calls=2)
    await reference.reporter.wait_drained(5)
    await reference.stop()  # waits for the orchestrator's answer
    counts = reference.reporter.counts
    assert (counts.answered, counts.accepted, counts.rejected) == (1, 1, {})

"""clients.GrpcDispatcher against the real reference services."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from clients.downstream import DownstreamConfig, GrpcDispatcher
from domain.dispatch import CallContext, DownstreamError, WorkRequest
from domain.models import Service, WorkKind
from orchestrator.v1 import task_update_pb2
from tests.reference.conftest import Stack

CTX = CallContext(tenant_id="acme", request_id="req-9", timeout_s=5.0, traceparent="00-ab-cd-01")


@pytest.fixture
async def dispatcher(stack: Stack) -> AsyncIterator[GrpcDispatcher]:
    client = GrpcDispatcher(DownstreamConfig(stack.reference.address, stack.reference.address))
    yield client
    await client.aclose()


def work(kind: WorkKind, job_id: str, content: str = "hello there") -> WorkRequest:
    return WorkRequest(
        job_id=job_id, tenant_id="acme", session_id="s", agent_id="bot", kind=kind, content=content
    )


@pytest.mark.parametrize("kind", list(WorkKind))
async def test_submit_returns_the_given_job_id_and_the_job_reports(
    stack: Stack, dispatcher: GrpcDispatcher, kind: WorkKind
) -> None:
    job_id = f"job-{kind.value}"
    assert await dispatcher.submit(work(kind, job_id), CTX) == job_id
    notices = await stack.orchestrator.recorder.wait_finished(job_id)
    assert notices[-1].event == task_update_pb2.NOTICE_EVENT_COMPLETED
    assert notices[-1].tenant_id == "acme"
    method = "SubmitEmbedding" if kind is WorkKind.EMBEDDING else "SubmitQuery"
    assert stack.reference.seen == [(method, job_id, "acme", "req-9", "00-ab-cd-01")]


@pytest.mark.parametrize("overrides", [{"step_delay_s": 30.0}])
async def test_cancel_through_the_dispatcher(stack: Stack, dispatcher: GrpcDispatcher) -> None:
    await dispatcher.submit(work(WorkKind.LLM_QUERY, "c1"), CTX)
    assert await dispatcher.cancel(Service.QUERY, "c1", CTX) is True
    assert await dispatcher.cancel(Service.QUERY, "c1", CTX) is False


async def test_empty_prompt_is_rejected(dispatcher: GrpcDispatcher) -> None:
    with pytest.raises(DownstreamError) as caught:
        await dispatcher.submit(work(WorkKind.LLM_QUERY, "bad", content=""), CTX)
    assert caught.value.code == "downstream_rejected"
    assert "prompt is required" in caught.value.message

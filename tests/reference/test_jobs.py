"""Reference services end to end: submits over gRPC, notices recorded by a stand-in
orchestrator's TaskUpdateService."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from conversation.v1 import conversation_pb2
from embedding.v1 import embedding_pb2
from orchestrator.v1 import common_pb2, task_update_pb2
from query.v1 import query_pb2
from reference import content
from reference.config import DEMO_SERVICE_KEY
from tests.reference.conftest import Stack, refused

PROGRESS = task_update_pb2.NOTICE_EVENT_PROGRESS
DELTA = task_update_pb2.NOTICE_EVENT_DELTA
COMPLETED = task_update_pb2.NOTICE_EVENT_COMPLETED
FAILED = task_update_pb2.NOTICE_EVENT_FAILED
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def ask(prompt: str, job_id: str) -> query_pb2.SubmitQueryRequest:
    return query_pb2.SubmitQueryRequest(
        tenant_id="acme", agent_id="bot", prompt=prompt, job_id=job_id
    )


async def test_query_job_reports_progress_deltas_and_completion_in_order(stack: Stack) -> None:
    reply = await stack.query.SubmitQuery(ask("what is two plus two", "job-1"), timeout=5)
    assert reply.job_id == "job-1"
    notices = await stack.orchestrator.recorder.wait_finished("job-1")

    assert [n.event for n in notices] == [PROGRESS, DELTA, DELTA, DELTA, PROGRESS, COMPLETED]
    assert [n.sequence for n in notices] == list(range(1, len(notices) + 1))
    assert (notices[0].progress, notices[0].status_message) == (0.0, "started")
    assert notices[-2].progress == 1.0
    for notice in notices:
        assert notice.service == common_pb2.SERVICE_QUERY
        assert (notice.job_id, notice.tenant_id, notice.agent_id) == ("job-1", "acme", "bot")

    final = notices[-1]
    text = "".join(n.delta for n in notices if n.event == DELTA)
    assert text == final.result.text == "Reference answer to: what is two plus two"
    assert final.result.model == "reference-llm"
    assert final.usage.prompt_tokens == 5
    assert final.usage.completion_tokens == len(text.split())
    assert final.usage.total_tokens == final.usage.prompt_tokens + final.usage.completion_tokens


async def test_query_output_is_deterministic_and_rag_names_collections(stack: Stack) -> None:
    await stack.query.SubmitQuery(ask("hello", "a"), timeout=5)
    await stack.query.SubmitQuery(ask("hello", "b"), timeout=5)
    rag = ask("hello", "c")
    rag.mode = query_pb2.QUERY_MODE_RAG
    rag.collections.extend(["docs", "faq"])
    rag.model = "m-9"
    await stack.query.SubmitQuery(rag, timeout=5)
    recorder = stack.orchestrator.recorder
    first, second, third = [await recorder.wait_finished(job) for job in ("a", "b", "c")]

    def strip(notices: list[task_update_pb2.PublishUpdatesRequest]) -> list[tuple[object, ...]]:
        return [(n.event, n.delta, n.result.text, n.sequence) for n in notices]

    assert strip(first) == strip(second)
    assert "docs, faq" in third[-1].result.text
    assert third[-1].result.model == "m-9"


@pytest.mark.parametrize("overrides", [{"deltas": 5}])
async def test_delta_count_follows_the_setting(stack: Stack) -> None:
    await stack.query.SubmitQuery(ask("count my deltas please", "d"), timeout=5)
    notices = await stack.orchestrator.recorder.wait_finished("d")
    deltas = [n.delta for n in notices if n.event == DELTA]
    assert len(deltas) == 5
    assert "".join(deltas) == notices[-1].result.text


@pytest.mark.parametrize("overrides", [{"embedding_dim": 5}])
async def test_embedding_vectors_are_deterministic_with_the_configured_dimension(
    stack: Stack,
) -> None:
    texts = ["the quick brown fox", "jumps"]
    for job in ("e1", "e2"):
        request = embedding_pb2.SubmitEmbeddingRequest(tenant_id="acme", texts=texts, job_id=job)
        assert (await stack.embedding.SubmitEmbedding(request, timeout=5)).job_id == job
    recorder = stack.orchestrator.recorder
    first, second = await recorder.wait_finished("e1"), await recorder.wait_finished("e2")

    assert [n.event for n in first] == [PROGRESS, COMPLETED]
    assert all(n.service == common_pb2.SERVICE_EMBEDDING for n in first)
    vectors = [list(v.values) for v in first[-1].result.embeddings]
    assert vectors == [list(v.values) for v in second[-1].result.embeddings]
    assert [len(v) for v in vectors] == [5, 5]
    assert vectors[0] == pytest.approx(content.embedding_vector(texts[0], 5), rel=1e-6)
    assert vectors[0] != vectors[1]
    assert first[-1].usage.prompt_tokens == 5
    assert first[-1].result.model == "reference-embedding"


@pytest.mark.parametrize("overrides", [{"failure_rate": 1.0}])
async def test_failing_jobs_report_progress_then_failed(stack: Stack) -> None:
    await stack.query.SubmitQuery(ask("doomed", "f1"), timeout=5)
    request = embedding_pb2.SubmitEmbeddingRequest(tenant_id="acme", texts=["x"], job_id="f2")
    await stack.embedding.SubmitEmbedding(request, timeout=5)
    for job in ("f1", "f2"):
        notices = await stack.orchestrator.recorder.wait_finished(job)
        assert [n.event for n in notices] == [PROGRESS, FAILED]
        assert notices[-1].error.code == "model_error"
        assert notices[-1].error.retryable is False
        assert job in notices[-1].error.message


@pytest.mark.parametrize("overrides", [{"silent_rate": 0.5}])
async def test_silent_jobs_send_nothing(stack: Stack) -> None:
    candidates = [f"job-{i}" for i in range(50)]
    silent = next(j for j in candidates if content.is_silent(j, 0.5))
    loud = next(j for j in candidates if not content.is_silent(j, 0.5))
    await stack.query.SubmitQuery(ask("shh", silent), timeout=5)
    await stack.query.SubmitQuery(ask("hi", loud), timeout=5)
    await stack.orchestrator.recorder.wait_finished(loud)
    await stack.reference.reporter.wait_drained(5)
    assert stack.orchestrator.recorder.job(silent) == []
    assert len(stack.reference.runtime.jobs) == 0  # the silent job is over, not pending


@pytest.mark.parametrize("overrides", [{"step_delay_s": 30.0}])
async def test_cancel_stops_the_job(stack: Stack) -> None:
    await stack.query.SubmitQuery(ask("long one", "slow"), timeout=5)
    recorder = stack.orchestrator.recorder
    await recorder.wait_until(lambda: len(recorder.job("slow")) == 1)

    wrong_tenant = query_pb2.CancelQueryRequest(tenant_id="other", job_id="slow")
    assert (await stack.query.CancelQuery(wrong_tenant, timeout=5)).cancelled is False
    cancel = query_pb2.CancelQueryRequest(tenant_id="acme", job_id="slow")
    assert (await stack.query.CancelQuery(cancel, timeout=5)).cancelled is True
    assert (await stack.query.CancelQuery(cancel, timeout=5)).cancelled is False
    unknown = query_pb2.CancelQueryRequest(tenant_id="acme", job_id="nope")
    assert (await stack.query.CancelQuery(unknown, timeout=5)).cancelled is False

    await stack.reference.reporter.wait_drained(5)
    assert len(stack.reference.runtime.jobs) == 0
    assert [n.event for n in recorder.job("slow")] == [PROGRESS]


@pytest.mark.parametrize("overrides", [{"step_delay_s": 30.0}])
async def test_cancel_embedding(stack: Stack) -> None:
    request = embedding_pb2.SubmitEmbeddingRequest(tenant_id="acme", texts=["x"], job_id="e")
    await stack.embedding.SubmitEmbedding(request, timeout=5)
    cancel = embedding_pb2.CancelEmbeddingRequest(tenant_id="acme", job_id="e")
    assert (await stack.embedding.CancelEmbedding(cancel, timeout=5)).cancelled is True
    assert (await stack.embedding.CancelEmbedding(cancel, timeout=5)).cancelled is False


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [({"job_id": "x"}, "tenant_id"), ({"tenant_id": "acme"}, "job_id")],
)
async def test_cancel_bounds(stack: Stack, request_fields: dict[str, str], field: str) -> None:
    await refused(
        stack.query.CancelQuery(query_pb2.CancelQueryRequest(**request_fields), timeout=5),
        grpc.StatusCode.INVALID_ARGUMENT,
        field,
    )
    await refused(
        stack.embedding.CancelEmbedding(
            embedding_pb2.CancelEmbeddingRequest(**request_fields), timeout=5
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        field,
    )


async def test_repeated_submit_is_the_same_job(stack: Stack) -> None:
    for _ in range(3):
        reply = await stack.query.SubmitQuery(ask("once", "dup"), timeout=5)
        assert reply.job_id == "dup"
    await stack.orchestrator.recorder.wait_finished("dup")
    await stack.reference.reporter.wait_drained(5)
    raw = [n for n in stack.orchestrator.recorder.notices if n.job_id == "dup"]
    assert [n.sequence for n in raw] == list(range(1, 7))
    assert len(stack.reference.seen) == 3


async def test_submits_record_request_id_and_traceparent(stack: Stack) -> None:
    await stack.query.SubmitQuery(
        ask("hi", "t1"),
        metadata=(("x-request-id", "req-1"), ("traceparent", TRACEPARENT)),
        timeout=5,
    )
    request = embedding_pb2.SubmitEmbeddingRequest(tenant_id="acme", texts=["x"])
    reply = await stack.embedding.SubmitEmbedding(request, timeout=5)
    assert len(reply.job_id) == 32  # generated when the request has none
    assert stack.reference.seen == [
        ("SubmitQuery", "t1", "acme", "req-1", TRACEPARENT),
        ("SubmitEmbedding", reply.job_id, "acme", None, None),
    ]


async def test_the_stream_carries_the_service_identity(stack: Stack) -> None:
    await stack.query.SubmitQuery(ask("hi", "m1"), timeout=5)
    await stack.orchestrator.recorder.wait_finished("m1")
    metadata = stack.orchestrator.recorder.stream_metadata[0]
    assert metadata["authorization"] == f"Bearer {DEMO_SERVICE_KEY}"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"system_prompt": "p" * (64 * 1024 + 1)}, "system_prompt"),
        ({"history": [conversation_pb2.Turn(content="no role")]}, "history[0].role"),
        ({"history": [conversation_pb2.Turn(role=conversation_pb2.ROLE_USER)] * 1001}, "history"),
    ],
)
async def test_query_bounds_system_prompt_and_history(
    stack: Stack, change: dict[str, Any], field: str
) -> None:
    request = ask("hi", "b1")
    for name, value in change.items():
        if isinstance(value, list):
            getattr(request, name).extend(value)
        else:
            setattr(request, name, value)
    await refused(
        stack.query.SubmitQuery(request, timeout=5), grpc.StatusCode.INVALID_ARGUMENT, field
    )
    assert stack.reference.seen == []


async def test_a_query_with_system_prompt_and_history_is_accepted(stack: Stack) -> None:
    request = ask("hi", "h1")
    request.system_prompt = "Be brief."
    request.history.append(conversation_pb2.Turn(role=conversation_pb2.ROLE_USER, content="x"))
    await stack.query.SubmitQuery(request, timeout=5)
    notices = await stack.orchestrator.recorder.wait_finished("h1")
    assert notices[-1].result.text == "Reference answer to: hi"


async def test_invalid_submits_are_rejected(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.query.SubmitQuery(ask("", "bad"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.embedding.SubmitEmbedding(
            embedding_pb2.SubmitEmbeddingRequest(tenant_id="acme"), timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_many_jobs_share_one_stream(stack: Stack) -> None:
    jobs = [f"many-{i}" for i in range(20)]
    for job in jobs:
        await stack.query.SubmitQuery(ask(f"prompt {job}", job), timeout=5)
    recorder = stack.orchestrator.recorder
    await recorder.wait_until(lambda: all(recorder.finished(j) for j in jobs))
    assert len(recorder.stream_metadata) == 1
    assert stack.reference.reporter.connects == 1

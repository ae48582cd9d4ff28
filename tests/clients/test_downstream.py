"""GrpcDispatcher against real grpc.aio servers on loopback with scripted servicers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from clients.downstream import DownstreamConfig, GrpcDispatcher
from domain.dispatch import CallContext, DownstreamError, WorkRequest
from domain.models import Service, WorkKind
from embedding.v1 import embedding_pb2, embedding_pb2_grpc
from query.v1 import query_pb2, query_pb2_grpc
from tests.clients.fakes import Script
from tests.support.redis_process import free_port

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class FakeQuery(query_pb2_grpc.QueryServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def SubmitQuery(
        self,
        request: query_pb2.SubmitQueryRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> query_pb2.SubmitQueryResponse:
        await self.script.play("SubmitQuery", request, context)
        return query_pb2.SubmitQueryResponse(job_id=request.job_id)

    async def CancelQuery(
        self,
        request: query_pb2.CancelQueryRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> query_pb2.CancelQueryResponse:
        await self.script.play("CancelQuery", request, context)
        return query_pb2.CancelQueryResponse(cancelled=True)


class FakeEmbedding(embedding_pb2_grpc.EmbeddingServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def SubmitEmbedding(
        self,
        request: embedding_pb2.SubmitEmbeddingRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> embedding_pb2.SubmitEmbeddingResponse:
        await self.script.play("SubmitEmbedding", request, context)
        return embedding_pb2.SubmitEmbeddingResponse(job_id="")  # empty: client falls back

    async def CancelEmbedding(
        self,
        request: embedding_pb2.CancelEmbeddingRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> embedding_pb2.CancelEmbeddingResponse:
        await self.script.play("CancelEmbedding", request, context)
        return embedding_pb2.CancelEmbeddingResponse(cancelled=False)


@dataclass
class Fakes:
    query: Script
    embedding: Script
    dispatcher: GrpcDispatcher


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    """Query and Embedding fakes on two servers (two ports, so routing is observable)."""
    query, embedding = Script(), Script()
    servers = [grpc.aio.server(), grpc.aio.server()]
    query_pb2_grpc.add_QueryServiceServicer_to_server(FakeQuery(query), servers[0])
    embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(FakeEmbedding(embedding), servers[1])
    ports = [server.add_insecure_port("127.0.0.1:0") for server in servers]
    for server in servers:
        await server.start()
    dispatcher = GrpcDispatcher(
        DownstreamConfig(
            query_address=f"127.0.0.1:{ports[0]}",
            embedding_address=f"127.0.0.1:{ports[1]}",
            attempt_timeout_s=2.0,
            backoff_base_s=0.01,
            backoff_cap_s=0.05,
        )
    )
    yield Fakes(query, embedding, dispatcher)
    await dispatcher.aclose()
    for server in servers:
        await server.stop(None)


def work(kind: WorkKind = WorkKind.LLM_QUERY, job_id: str = "job-1") -> WorkRequest:
    return WorkRequest(
        job_id=job_id,
        tenant_id="acme",
        session_id="s-1",
        agent_id="agent-7",
        kind=kind,
        content="what is the answer",
        model="m-1",
        collections=("docs", "faq") if kind is WorkKind.RAG_QUERY else (),
    )


CTX = CallContext(tenant_id="acme", request_id="req-42", timeout_s=5.0, traceparent=TRACEPARENT)


async def test_query_submit_passes_job_id_and_fields(fakes: Fakes) -> None:
    assert await fakes.dispatcher.submit(work(WorkKind.RAG_QUERY), CTX) == "job-1"
    [(method, request, _)] = fakes.query.calls
    assert method == "SubmitQuery"
    assert isinstance(request, query_pb2.SubmitQueryRequest)
    assert request.job_id == "job-1"
    assert request.mode == query_pb2.QUERY_MODE_RAG
    assert list(request.collections) == ["docs", "faq"]
    assert (request.tenant_id, request.agent_id, request.prompt) == (
        "acme",
        "agent-7",
        "what is the answer",
    )
    assert request.request_id == "req-42"
    assert fakes.embedding.calls == []


async def test_embedding_submit_goes_to_embedding_and_falls_back_to_given_job_id(
    fakes: Fakes,
) -> None:
    assert await fakes.dispatcher.submit(work(WorkKind.EMBEDDING, "job-e"), CTX) == "job-e"
    [(method, request, _)] = fakes.embedding.calls
    assert method == "SubmitEmbedding"
    assert isinstance(request, embedding_pb2.SubmitEmbeddingRequest)
    assert (request.job_id, list(request.texts)) == ("job-e", ["what is the answer"])
    assert fakes.query.calls == []


async def test_metadata_reaches_the_service(fakes: Fakes) -> None:
    await fakes.dispatcher.submit(work(), CTX)
    metadata = fakes.query.calls[0][2]
    assert metadata["x-tenant-id"] == "acme"
    assert metadata["x-request-id"] == "req-42"
    assert metadata["traceparent"] == TRACEPARENT


async def test_no_traceparent_header_without_one(fakes: Fakes) -> None:
    await fakes.dispatcher.submit(work(), CallContext(tenant_id="acme", request_id="r"))
    assert "traceparent" not in fakes.query.calls[0][2]


async def test_retries_unavailable_then_succeeds_with_the_same_job_id(fakes: Fakes) -> None:
    fakes.query.unavailable = 2
    assert await fakes.dispatcher.submit(work(), CTX) == "job-1"
    assert len(fakes.query.calls) == 3
    assert {call[1].job_id for call in fakes.query.calls} == {"job-1"}  # type: ignore[attr-defined]


async def test_gives_up_after_max_attempts_as_unavailable(fakes: Fakes) -> None:
    fakes.query.unavailable = 10
    with pytest.raises(DownstreamError) as caught:
        await fakes.dispatcher.submit(work(), CTX)
    assert caught.value.code == "downstream_unavailable"
    assert caught.value.retryable is True
    assert "query service" in caught.value.message
    assert len(fakes.query.calls) == 3


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION]
)
async def test_rejection_is_not_retried(fakes: Fakes, code: grpc.StatusCode) -> None:
    fakes.query.abort = code
    with pytest.raises(DownstreamError) as caught:
        await fakes.dispatcher.submit(work(), CTX)
    assert caught.value.code == "downstream_rejected"
    assert caught.value.retryable is False
    assert "prompt is empty" in caught.value.message
    assert len(fakes.query.calls) == 1


async def test_other_errors_are_downstream_error_without_retry(fakes: Fakes) -> None:
    fakes.embedding.abort = grpc.StatusCode.INTERNAL
    with pytest.raises(DownstreamError) as caught:
        await fakes.dispatcher.submit(work(WorkKind.EMBEDDING), CTX)
    assert caught.value.code == "downstream_error"
    assert "embedding service" in caught.value.message
    assert len(fakes.embedding.calls) == 1


async def test_caller_deadline_bounds_a_slow_service(fakes: Fakes) -> None:
    fakes.query.delay_s = 5.0
    started = time.monotonic()
    with pytest.raises(DownstreamError) as caught:
        await fakes.dispatcher.submit(work(), CallContext("acme", "r", timeout_s=0.3))
    elapsed = time.monotonic() - started
    assert caught.value.code == "downstream_timeout"
    assert caught.value.retryable is True
    assert elapsed < 1.5
    assert len(fakes.query.calls) == 1  # a timeout is not retried


async def test_attempt_timeout_applies_without_a_caller_deadline(fakes: Fakes) -> None:
    dispatcher = GrpcDispatcher(
        DownstreamConfig(
            query_address=fakes.dispatcher.config.query_address,
            embedding_address=fakes.dispatcher.config.embedding_address,
            attempt_timeout_s=0.2,
        )
    )
    fakes.query.delay_s = 5.0
    try:
        with pytest.raises(DownstreamError) as caught:
            await dispatcher.submit(work(), CallContext("acme", "r"))
        assert caught.value.code == "downstream_timeout"
    finally:
        await dispatcher.aclose()


async def test_retries_stop_at_the_caller_deadline(fakes: Fakes) -> None:
    dispatcher = GrpcDispatcher(
        DownstreamConfig(
            query_address=fakes.dispatcher.config.query_address,
            embedding_address=fakes.dispatcher.config.embedding_address,
            max_attempts=100,
            backoff_base_s=0.1,
            backoff_cap_s=0.1,
        )
    )
    fakes.query.unavailable = 1000
    started = time.monotonic()
    try:
        with pytest.raises(DownstreamError) as caught:
            await dispatcher.submit(work(), CallContext("acme", "r", timeout_s=0.5))
    finally:
        await dispatcher.aclose()
    assert caught.value.code in ("downstream_unavailable", "downstream_timeout")
    assert time.monotonic() - started < 1.0
    assert len(fakes.query.calls) < 100


async def test_unreachable_service_is_unavailable_quickly() -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens here
    dispatcher = GrpcDispatcher(
        DownstreamConfig(address, address, backoff_base_s=0.01, backoff_cap_s=0.05)
    )
    started = time.monotonic()
    try:
        with pytest.raises(DownstreamError) as caught:
            await dispatcher.submit(work(), CallContext("acme", "r", timeout_s=10.0))
    finally:
        await dispatcher.aclose()
    assert caught.value.code == "downstream_unavailable"
    assert address in caught.value.message
    assert time.monotonic() - started < 5.0


async def test_cancel_routes_to_the_service_that_runs_the_job(fakes: Fakes) -> None:
    assert await fakes.dispatcher.cancel(Service.QUERY, "job-q", CTX) is True
    assert await fakes.dispatcher.cancel(Service.EMBEDDING, "job-e", CTX) is False
    [(q_method, q_request, q_metadata)] = fakes.query.calls
    [(e_method, e_request, _)] = fakes.embedding.calls
    assert q_method == "CancelQuery"
    assert isinstance(q_request, query_pb2.CancelQueryRequest)
    assert (q_request.tenant_id, q_request.job_id) == ("acme", "job-q")
    assert q_metadata["x-request-id"] == "req-42"
    assert e_method == "CancelEmbedding"
    assert isinstance(e_request, embedding_pb2.CancelEmbeddingRequest)
    assert (e_request.tenant_id, e_request.job_id) == ("acme", "job-e")


async def test_cancel_retries_unavailable(fakes: Fakes) -> None:
    fakes.query.unavailable = 1
    assert await fakes.dispatcher.cancel(Service.QUERY, "job-q", CTX) is True
    assert len(fakes.query.calls) == 2


async def test_aclose_is_idempotent_and_channels_reopen(fakes: Fakes) -> None:
    await fakes.dispatcher.submit(work(), CTX)
    await fakes.dispatcher.aclose()
    await fakes.dispatcher.aclose()
    assert await fakes.dispatcher.submit(work(job_id="job-2"), CTX) == "job-2"

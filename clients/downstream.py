"""GrpcDispatcher: domain.dispatch.Dispatcher over the Query and Embedding services' stubs."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TypeVar

import grpc

from clients.retry import RetryPolicy, call_with_retries
from domain.dispatch import CallContext, WorkRequest
from domain.models import Service, WorkKind
from embedding.v1 import embedding_pb2, embedding_pb2_grpc
from query.v1 import query_pb2, query_pb2_grpc

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# Reconnect quickly after a downstream restart instead of gRPC's default backoff (up to 120 s).
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]

_QUERY_MODES = {
    WorkKind.LLM_QUERY: query_pb2.QUERY_MODE_LLM,
    WorkKind.RAG_QUERY: query_pb2.QUERY_MODE_RAG,
}


@dataclass(frozen=True, slots=True)
class DownstreamConfig:
    """Where the downstream services are and how calls to them are retried."""

    query_address: str
    embedding_address: str
    retry: RetryPolicy = field(default_factory=RetryPolicy)


def call_metadata(ctx: CallContext) -> tuple[tuple[str, str], ...]:
    """Tenant, request id and (when present) W3C trace context for every downstream call."""
    metadata = [("x-tenant-id", ctx.tenant_id), ("x-request-id", ctx.request_id)]
    if ctx.traceparent:
        metadata.append(("traceparent", ctx.traceparent))
    return tuple(metadata)


class GrpcDispatcher:
    """One long-lived channel per downstream service, opened on first use."""

    def __init__(self, config: DownstreamConfig) -> None:
        self.config = config
        # At least one attempt, whatever the configuration says.
        self._policy = replace(config.retry, max_attempts=max(1, config.retry.max_attempts))
        self._query_channel: grpc.aio.Channel | None = None
        self._embedding_channel: grpc.aio.Channel | None = None
        self._query: query_pb2_grpc.QueryServiceAsyncStub | None = None
        self._embedding: embedding_pb2_grpc.EmbeddingServiceAsyncStub | None = None

    def _query_stub(self) -> query_pb2_grpc.QueryServiceAsyncStub:
        if self._query is None:
            channel = grpc.aio.insecure_channel(self.config.query_address, options=CHANNEL_OPTIONS)
            self._query_channel = channel
            self._query = query_pb2_grpc.QueryServiceStub(channel)
        return self._query

    def _embedding_stub(self) -> embedding_pb2_grpc.EmbeddingServiceAsyncStub:
        if self._embedding is None:
            channel = grpc.aio.insecure_channel(
                self.config.embedding_address, options=CHANNEL_OPTIONS
            )
            self._embedding_channel = channel
            self._embedding = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        return self._embedding

    async def _unary(
        self,
        service: Service,
        name: str,
        method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        ctx: CallContext,
    ) -> Resp:
        """One logical call (``name`` on ``service``), retried within the caller's budget."""
        address = (
            self.config.query_address if service is Service.QUERY else self.config.embedding_address
        )
        metadata = call_metadata(ctx)

        async def attempt(attempt_s: float) -> Resp:
            return await method(request, timeout=attempt_s, metadata=metadata)

        return await call_with_retries(
            attempt,
            what=f"{service.value} service ({name} at {address})",
            policy=self._policy,
            budget_s=ctx.timeout_s,
        )

    async def submit(self, work: WorkRequest, ctx: CallContext) -> str:
        """Start the work under ``work.job_id``; retrying is safe because the id is fixed."""
        if work.service is Service.EMBEDDING:
            embedding = self._embedding_stub().SubmitEmbedding
            embedded = await self._unary(
                work.service, "SubmitEmbedding", embedding, _embedding_request(work, ctx), ctx
            )
            return embedded.job_id or work.job_id
        query = self._query_stub().SubmitQuery
        queried = await self._unary(
            work.service, "SubmitQuery", query, _query_request(work, ctx), ctx
        )
        return queried.job_id or work.job_id

    async def cancel(self, service: Service, job_id: str, ctx: CallContext) -> bool:
        """Ask the service that runs the job to stop it; True when it was still running."""
        if service is Service.EMBEDDING:
            embed_cancel = embedding_pb2.CancelEmbeddingRequest(
                tenant_id=ctx.tenant_id, job_id=job_id
            )
            stub = self._embedding_stub()
            reply = await self._unary(
                service, "CancelEmbedding", stub.CancelEmbedding, embed_cancel, ctx
            )
            return reply.cancelled
        query_cancel = query_pb2.CancelQueryRequest(tenant_id=ctx.tenant_id, job_id=job_id)
        query_stub = self._query_stub()
        query_reply = await self._unary(
            service, "CancelQuery", query_stub.CancelQuery, query_cancel, ctx
        )
        return query_reply.cancelled

    async def aclose(self) -> None:
        """Close both channels; the dispatcher reopens them if used again."""
        channels = (self._query_channel, self._embedding_channel)
        self._query_channel = self._embedding_channel = None
        self._query = self._embedding = None
        for channel in channels:
            if channel is not None:
                await channel.close(grace=None)


def _embedding_request(work: WorkRequest, ctx: CallContext) -> embedding_pb2.SubmitEmbeddingRequest:
    return embedding_pb2.SubmitEmbeddingRequest(
        tenant_id=work.tenant_id,
        session_id=work.session_id,
        texts=[work.content],
        model=work.model,
        request_id=ctx.request_id,
        job_id=work.job_id,
    )


def _query_request(work: WorkRequest, ctx: CallContext) -> query_pb2.SubmitQueryRequest:
    return query_pb2.SubmitQueryRequest(
        tenant_id=work.tenant_id,
        session_id=work.session_id,
        agent_id=work.agent_id,
        prompt=work.content,
        mode=_QUERY_MODES.get(work.kind, query_pb2.QUERY_MODE_LLM),
        model=work.model,
        collections=list(work.collections),
        request_id=ctx.request_id,
        job_id=work.job_id,
    )

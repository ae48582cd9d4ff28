"""orchestrator.internal.v1.PlatformService: the internal API platform services call for the
jobs they run (domain.internal_calls). Service keys only (server.auth); conversion only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from domain.internal_calls import (
    Completion,
    CompletionCall,
    EmbedCall,
    Embeddings,
    InternalCalls,
)
from handlers.call_context import Ctx, call_context
from handlers.converters import usage_to_pb
from handlers.errors import stream_errors, unary_errors
from handlers.request_context import current_caller
from orchestrator.internal.v1 import platform_pb2, platform_pb2_grpc
from orchestrator.v1 import common_pb2


def completion_to_pb(completion: Completion) -> platform_pb2.CompleteResponse:
    return platform_pb2.CompleteResponse(
        call_id=completion.call_id,
        call_job_id=completion.call_job_id,
        text=completion.text,
        model=completion.model,
        usage=usage_to_pb(completion.usage),
        replayed=completion.replayed,
    )


def embeddings_to_pb(embeddings: Embeddings) -> platform_pb2.EmbedResponse:
    return platform_pb2.EmbedResponse(
        call_id=embeddings.call_id,
        embeddings=[common_pb2.Vector(values=vector) for vector in embeddings.vectors],
        usage=usage_to_pb(embeddings.usage),
        cached=embeddings.cached,
        replayed=embeddings.replayed,
    )


def _completion_call(
    request: platform_pb2.CompleteRequest | platform_pb2.StreamCompleteRequest,
) -> CompletionCall:
    return CompletionCall(
        tenant_id=request.tenant_id,
        job_id=request.job_id,
        call_id=request.call_id,
        prompt=request.prompt,
        model=request.model,
        collections=tuple(request.collections),
    )


class PlatformServicer(platform_pb2_grpc.PlatformServiceServicer):
    """Thin adapter over domain.internal_calls.InternalCalls."""

    def __init__(self, calls: InternalCalls) -> None:
        self._calls = calls

    @unary_errors
    async def Complete(
        self, request: platform_pb2.CompleteRequest, context: Ctx
    ) -> platform_pb2.CompleteResponse:
        calls = self._calls.complete(
            current_caller(), call_context(context), _completion_call(request)
        )
        async with aclosing(calls):
            async for item in calls:
                if isinstance(item, Completion):
                    return completion_to_pb(item)
        raise AssertionError("a completion ends with its outcome or an error")

    @stream_errors
    async def StreamComplete(
        self, request: platform_pb2.StreamCompleteRequest, context: Ctx
    ) -> AsyncIterator[platform_pb2.StreamCompleteResponse]:
        calls = self._calls.complete(
            current_caller(), call_context(context), _completion_call(request)
        )
        # Closed here, in this call's task, however the stream ends (the call's span with it).
        async with aclosing(calls):
            async for item in calls:
                if isinstance(item, Completion):
                    yield platform_pb2.StreamCompleteResponse(final=completion_to_pb(item))
                else:
                    yield platform_pb2.StreamCompleteResponse(delta=item)

    @unary_errors
    async def Embed(
        self, request: platform_pb2.EmbedRequest, context: Ctx
    ) -> platform_pb2.EmbedResponse:
        call = EmbedCall(
            tenant_id=request.tenant_id,
            job_id=request.job_id,
            call_id=request.call_id,
            texts=tuple(request.texts),
            model=request.model,
        )
        embeddings = await self._calls.embed(current_caller(), call_context(context), call)
        return embeddings_to_pb(embeddings)

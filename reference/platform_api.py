"""The reference services' client of the orchestrator's internal API
(orchestrator.internal.v1.PlatformService): every LLM completion and embedding the reference
Agent Execution and Workflow Engine need for a job goes through it, with the service key they
report with, so the orchestrator charges and traces it as part of that job.

A call that fails UNAVAILABLE (an orchestrator replica restarting) is made again with the same
call id on the next replica after a short backoff: the orchestrator runs and charges a call id
once, and a repeated StreamComplete answers from the start (the text already forwarded is
skipped)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from orchestrator.internal.v1 import platform_pb2, platform_pb2_grpc
from reference.reporter import channel_options, split_targets

# Attempts of one call over the orchestrator's replicas, and the backoff between them.
ATTEMPTS = 4
BACKOFF_S = 0.2


class PlatformCallError(Exception):
    """An internal call failed for good: ``code`` is the gRPC status name."""

    def __init__(self, code: str, message: str, *, retryable: bool) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class CallOrigin:
    """The job a call serves and the trace headers of the request that started it."""

    tenant_id: str
    job_id: str
    request_id: str | None = None
    traceparent: str | None = None


class PlatformApi:
    """Channels to the orchestrator's replicas (those the reporter publishes to)."""

    def __init__(
        self, orchestrator_address: str, metadata: Sequence[tuple[str, str]], timeout_s: float
    ) -> None:
        self._targets = split_targets(orchestrator_address)
        self._metadata = tuple(metadata)
        self._timeout_s = timeout_s
        self._channels: list[grpc.aio.Channel] = []
        self._next = 0

    def _stub(self) -> platform_pb2_grpc.PlatformServiceAsyncStub:
        if not self._channels:
            self._channels = [
                grpc.aio.insecure_channel(t, options=channel_options(t)) for t in self._targets
            ]
        channel = self._channels[self._next % len(self._channels)]
        return platform_pb2_grpc.PlatformServiceStub(channel)

    def _call_metadata(self, origin: CallOrigin) -> tuple[tuple[str, str], ...]:
        extra = []
        if origin.request_id:
            extra.append(("x-request-id", origin.request_id))
        if origin.traceparent:
            extra.append(("traceparent", origin.traceparent))
        return (*self._metadata, *extra)

    async def _failed(self, exc: grpc.aio.AioRpcError, attempt: int) -> None:
        """Back off before the next attempt, or raise: only UNAVAILABLE is tried again."""
        retryable = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)
        if not retryable or attempt + 1 >= ATTEMPTS:
            raise PlatformCallError(
                exc.code().name, exc.details() or "", retryable=retryable
            ) from None
        self._next += 1
        await asyncio.sleep(BACKOFF_S * (attempt + 1))

    async def stream_complete(
        self, origin: CallOrigin, call_id: str, prompt: str, model: str
    ) -> AsyncIterator[str | platform_pb2.CompleteResponse]:
        """The completion's new text as it comes, then its final message."""
        request = platform_pb2.StreamCompleteRequest(
            tenant_id=origin.tenant_id,
            job_id=origin.job_id,
            call_id=call_id,
            prompt=prompt,
            model=model,
        )
        sent = 0  # characters already yielded (a repeated call streams from the start)
        for attempt in range(ATTEMPTS):
            received = 0
            try:
                stream = self._stub().StreamComplete(
                    request, metadata=self._call_metadata(origin), timeout=self._timeout_s
                )
                async for message in stream:
                    if message.WhichOneof("event") == "final":
                        yield message.final
                        return
                    text = message.delta
                    new = text[max(sent - received, 0) :]
                    received += len(text)
                    if new:
                        sent += len(new)
                        yield new
            except grpc.aio.AioRpcError as exc:
                await self._failed(exc, attempt)
        raise PlatformCallError("UNAVAILABLE", "no final message", retryable=True)

    async def embed(
        self, origin: CallOrigin, call_id: str, texts: Sequence[str], model: str = ""
    ) -> platform_pb2.EmbedResponse:
        request = platform_pb2.EmbedRequest(
            tenant_id=origin.tenant_id,
            job_id=origin.job_id,
            call_id=call_id,
            texts=list(texts),
            model=model,
        )
        for attempt in range(ATTEMPTS):
            try:
                reply: platform_pb2.EmbedResponse = await self._stub().Embed(
                    request, metadata=self._call_metadata(origin), timeout=self._timeout_s
                )
                return reply
            except grpc.aio.AioRpcError as exc:
                await self._failed(exc, attempt)
        raise PlatformCallError("UNAVAILABLE", "no answer", retryable=True)

    async def close(self) -> None:
        channels, self._channels = self._channels, []
        for channel in channels:
            await channel.close(grace=None)

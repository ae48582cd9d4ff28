"""The channel, the call metadata and the retry loops every API shares."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import grpc
import grpc.aio

from aorkestra import events as ev
from aorkestra._proto.orchestrator.admin.v1 import admin_pb2_grpc
from aorkestra._proto.orchestrator.v1 import (
    batch_pb2_grpc,
    chat_pb2,
    chat_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
)
from aorkestra.config import ClientConfig
from aorkestra.errors import (
    HistoryTruncatedError,
    NotFound,
    OrchestratorError,
    from_rpc_error,
)

log = logging.getLogger("aorkestra")

T = TypeVar("T")
OnTruncated = Literal["raise", "yield"]

# A stream that fails with one of these lost its transport (a dropped connection, a server
# process stopping or restarting), not its request: it is reopened from the last sequence.
_STREAM_TRANSIENT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED}
)
# grpc reports some transport failures as INTERNAL/UNKNOWN with these messages.
_TRANSPORT_MESSAGES = ("rst_stream", "stream removed", "socket closed", "connection reset")
_OPEN_STATES = (session_pb2.SESSION_STATE_ACTIVE, session_pb2.SESSION_STATE_BUSY)


@dataclass(frozen=True, slots=True)
class RetryNotice:
    """Told to ``on_retry`` before the SDK waits and tries again."""

    method: str
    attempt: int  # the retry about to happen, 1-based
    delay_s: float
    error: OrchestratorError
    advertised: bool  # the delay came from the server (RetryInfo or retry-after)


def _transport_failure(error: OrchestratorError) -> bool:
    if error.code in _STREAM_TRANSIENT:
        return True
    if error.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        text = error.message.lower()
        return any(marker in text for marker in _TRANSPORT_MESSAGES)
    return False


class Transport:
    def __init__(
        self, config: ClientConfig, on_retry: Callable[[RetryNotice], None] | None = None
    ) -> None:
        self.config = config
        self.on_retry = on_retry
        credentials = config.credentials()
        options = config.channel_options()
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(config.address, options=options)
        else:
            self.channel = grpc.aio.secure_channel(config.address, credentials, options=options)
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {config.api_key}"),) if config.api_key else ()
        )
        self.chat = chat_pb2_grpc.ChatServiceStub(self.channel)
        self.sessions = session_pb2_grpc.SessionServiceStub(self.channel)
        self.batches = batch_pb2_grpc.BatchServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close(grace=None)

    # -- unary -------------------------------------------------------------------------------

    def retry_delay(
        self, error: OrchestratorError, attempt: int, *, safe: bool, limit: int | None
    ) -> float | None:
        policy = self.config.retry
        if limit is not None and attempt >= limit:
            return None
        advertised = error.retry_delay_s
        if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # Refused before it ran (rate limit): any call may be sent again, when told when.
            return None if advertised is None else policy.delay(attempt, advertised)
        if safe and error.code == grpc.StatusCode.UNAVAILABLE:
            return policy.delay(attempt, advertised)
        return None

    async def wait_retry(
        self, method: str, error: OrchestratorError, attempt: int, delay: float
    ) -> None:
        notice = RetryNotice(method, attempt, delay, error, error.retry_delay_s is not None)
        log.info("%s: %s; retry %d in %.2fs", method, error, attempt, delay)
        if self.on_retry is not None:
            self.on_retry(notice)
        await asyncio.sleep(delay)

    async def unary(
        self,
        call: Callable[..., Awaitable[T]],
        request: Any,
        *,
        safe: bool,
        timeout_s: float | None = None,
    ) -> T:
        """One unary call with retries: RESOURCE_EXHAUSTED with an advertised delay always,
        UNAVAILABLE when ``safe`` (reads, idempotent writes), up to max_attempts. Errors and
        retries name the method after its request (GetBatchRequest: GetBatch), the naming
        buf lint holds every RPC to."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call(
                    request,
                    metadata=self.metadata,
                    timeout=timeout_s or self.config.timeout_s,
                )
            except grpc.aio.AioRpcError as exc:
                method = type(request).__name__.removesuffix("Request")
                error = from_rpc_error(exc, method)
                delay = self.retry_delay(
                    error, attempt, safe=safe, limit=self.config.retry.max_attempts
                )
                if delay is None:
                    raise error from None
                await self.wait_retry(method, error, attempt, delay)

    # -- streams -----------------------------------------------------------------------------

    def stream_delay(self, error: OrchestratorError, failures: int) -> float | None:
        """The pause before reopening a stream that failed ``failures`` times in a row."""
        policy = self.config.retry
        if policy.max_reconnects is not None and failures > policy.max_reconnects:
            return None
        if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return (
                None if error.retry_delay_s is None else policy.delay(failures, error.retry_delay_s)
            )
        if _transport_failure(error):
            return policy.delay(failures, error.retry_delay_s)
        return None

    async def session_open(self, session_id: str) -> bool:
        """Whether a session still takes events (a stream that ended may be a server going
        away rather than the session closing). Retries while the server is unreachable."""
        try:
            response = await self.unary(
                self.sessions.GetSession,
                session_pb2.GetSessionRequest(session_id=session_id),
                safe=True,
            )
        except NotFound:
            return False
        return response.session.state in _OPEN_STATES

    async def follow(
        self,
        session_id: str,
        after: int,
        *,
        on_truncated: OnTruncated,
        job_id: str = "",
        until_final: bool = False,
        first_error: OrchestratorError | None = None,
    ) -> AsyncIterator[ev.Event]:
        """StreamSession from ``after``, reopened from the last sequence seen whenever the
        transport fails or the stream ends while the session is still open. Never yields a
        sequence twice. ``job_id`` keeps one job's events (and the truncation notice);
        ``until_final`` stops after that job's final event."""
        cursor = after
        failures = 0
        error = first_error
        while True:
            if error is not None:
                failures += 1
                delay = self.stream_delay(error, failures)
                if delay is None:
                    raise error
                await self.wait_retry("StreamSession", error, failures, delay)
                error = None
            call = self.chat.StreamSession(
                chat_pb2.StreamSessionRequest(session_id=session_id, after_sequence=cursor),
                metadata=self.metadata,
            )
            try:
                async for message in call:
                    pb = message.event
                    if pb.sequence <= cursor:
                        continue  # already yielded before a reconnect
                    cursor = pb.sequence
                    failures = 0
                    event = ev.from_proto(pb)
                    if isinstance(event, ev.HistoryTruncated):
                        if on_truncated == "raise":
                            raise HistoryTruncatedError(
                                session_id, event.requested_after, event.oldest_retained
                            )
                        yield event
                        continue
                    if job_id and pb.job_id != job_id:
                        continue
                    yield event
                    if until_final and event.final:
                        return
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc, "StreamSession")
                continue
            finally:
                call.cancel()
            # The server ended the stream: the session closed or expired, or the server is
            # going away (a graceful stop ends every stream).
            if not await self.session_open(session_id):
                return
            error = OrchestratorError(
                "the stream ended while the session is open", code=grpc.StatusCode.UNAVAILABLE
            )

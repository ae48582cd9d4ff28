"""The one place where domain errors become gRPC statuses (with rich error details)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from domain.errors import (
    Aborted,
    AlreadyExists,
    DataLoss,
    DeadlineExceeded,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from handlers.call_context import Ctx
from handlers.request_context import REQUEST_ID_HEADER, current_request_id
from handlers.request_limits import check_request

log = logging.getLogger(__name__)

_CODES: dict[type[DomainError], int] = {
    InvalidArgument: code_pb2.INVALID_ARGUMENT,
    NotFound: code_pb2.NOT_FOUND,
    AlreadyExists: code_pb2.ALREADY_EXISTS,
    FailedPrecondition: code_pb2.FAILED_PRECONDITION,
    Unauthenticated: code_pb2.UNAUTHENTICATED,
    PermissionDenied: code_pb2.PERMISSION_DENIED,
    ResourceExhausted: code_pb2.RESOURCE_EXHAUSTED,
    Unavailable: code_pb2.UNAVAILABLE,
    DeadlineExceeded: code_pb2.DEADLINE_EXCEEDED,
    DataLoss: code_pb2.DATA_LOSS,
    Aborted: code_pb2.ABORTED,
}


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_grpc_status(error: DomainError) -> grpc.Status:
    """The gRPC status for a domain error, with google.rpc details where they help."""
    code = next((c for cls, c in _CODES.items() if isinstance(error, cls)), code_pb2.INTERNAL)
    status = status_pb2.Status(code=code, message=error.message)
    if isinstance(error, InvalidArgument):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in error.violations
            ]
        )
        status.details.append(_pack(bad_request))
    elif isinstance(error, ResourceExhausted):
        if error.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(int(error.retry_after_s * 1000))
            status.details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        if error.quota_subject:
            violation = error_details_pb2.QuotaFailure.Violation(
                subject=error.quota_subject, description=error.quota_description
            )
            status.details.append(_pack(error_details_pb2.QuotaFailure(violations=[violation])))
    return rpc_status.to_status(status)


def trailing_metadata_for(error: DomainError) -> tuple[tuple[str, str | bytes], ...]:
    """Extra trailing metadata: a plain retry-after header for rate-limited calls."""
    if isinstance(error, ResourceExhausted) and error.retry_after_s is not None:
        return (("retry-after", str(max(1, round(error.retry_after_s)))),)
    return ()


def _request_id_trailer() -> tuple[tuple[str, str | bytes], ...]:
    """The call's request id as trailing metadata: an abort replaces the trailers the edge may
    have set, and a failed call should name its request id wherever it is read."""
    request_id = current_request_id()
    return ((REQUEST_ID_HEADER, request_id),) if request_id else ()


class _CallGoneIsCancellation:
    """The context manager of :func:`call_gone_is_cancellation`: a class with no state (one
    instance serves every use), as it wraps every message a server stream writes and a
    generator-based one costs a generator per use."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, grpc.aio.InternalError):
            log.debug("call ended under an operation on it (the client went away): %s", exc)
            raise asyncio.CancelledError("the call has ended") from None


_CALL_GONE_IS_CANCELLATION = _CallGoneIsCancellation()


def call_gone_is_cancellation() -> _CallGoneIsCancellation:
    """Around an operation on the call (sending metadata, a message or the status): when it
    fails because the call has already ended (the client cancelled, closed its channel or died,
    or the deadline passed), raise CancelledError, as grpc does when it notices the client went
    away first.

    grpc.aio raises ExecuteBatchError (a grpc.aio.InternalError) from an operation that core
    fails. When that error leaves the servicer, grpc logs it as an ERROR with a traceback unless
    it has already seen the call's close, and the two race: a write blocked by flow control
    (a client that stopped reading) fails before grpc sees the close. A CancelledError it logs
    at DEBUG ("RPC cancelled"): a client going away is not an error."""
    return _CALL_GONE_IS_CANCELLATION


async def abort_with(context: Ctx, error: DomainError) -> None:
    """End the call with the status for ``error`` (CancelledError when it has ended already)."""
    status = to_grpc_status(error)
    metadata = (
        tuple(status.trailing_metadata) + trailing_metadata_for(error) + _request_id_trailer()
    )
    with call_gone_is_cancellation():
        await context.abort(status.code, status.details, metadata)


async def abort_internal(context: Ctx, exc: Exception) -> None:
    log.exception("unhandled error in RPC handler", exc_info=exc)
    with call_gone_is_cancellation():
        await context.abort(grpc.StatusCode.INTERNAL, "internal error", _request_id_trailer())


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")
UnaryMethod = Callable[[Self, Req, Ctx], Awaitable[Resp]]
"""A unary servicer method (``UnaryMethod[Servicer, Request, Response]``)."""


def unary_errors(method: UnaryMethod[Self, Req, Resp]) -> UnaryMethod[Self, Req, Resp]:
    """Decorate a unary servicer method so domain errors end the call with their status."""

    @functools.wraps(method)
    async def wrapper(self: Self, request: Req, context: Ctx) -> Resp:
        try:
            if isinstance(request, Message):  # client streams are bounded per message
                check_request(request)
            return await method(self, request, context)
        except DomainError as error:
            await abort_with(context, error)
            raise  # unreachable: abort raises
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_internal(context, exc)
            raise

    return wrapper


def stream_errors(
    method: Callable[[Self, Req, Ctx], AsyncIterator[Resp]],
) -> Callable[[Self, Req, Ctx], AsyncIterator[Resp]]:
    """Decorate a server-streaming servicer method (an async generator) the same way. The
    wrapper is itself an async generator, so tracing interceptors can wrap it."""

    @functools.wraps(method)
    async def wrapper(self: Self, request: Req, context: Ctx) -> AsyncIterator[Resp]:
        try:
            if isinstance(request, Message):
                check_request(request)
            async for response in method(self, request, context):
                yield response
        except DomainError as error:
            await abort_with(context, error)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_internal(context, exc)

    return wrapper

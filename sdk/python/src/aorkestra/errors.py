"""Typed errors: one exception class per gRPC status, each carrying the request id and the
``google.rpc`` details the server attached (BadRequest, QuotaFailure, RetryInfo, ErrorInfo)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

REQUEST_ID_HEADER = "x-request-id"
RETRY_AFTER_HEADER = "retry-after"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One field a request got wrong (google.rpc.BadRequest)."""

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class QuotaViolation:
    """One quota a request ran into (google.rpc.QuotaFailure)."""

    subject: str
    description: str


@dataclass(frozen=True, slots=True)
class ErrorDetails:
    """The google.rpc details of a failed call."""

    field_violations: tuple[FieldViolation, ...] = ()
    quota_violations: tuple[QuotaViolation, ...] = ()
    # RetryInfo.retry_delay, or the retry-after trailer when there is no RetryInfo.
    retry_delay_s: float | None = None
    reason: str = ""  # google.rpc.ErrorInfo
    domain: str = ""
    error_metadata: dict[str, str] = field(default_factory=dict)


class OrchestratorError(Exception):
    """A call the server (or the transport) refused. ``code`` is the gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        request_id: str = "",
        details: ErrorDetails | None = None,
        method: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.request_id = request_id
        self.details = details or ErrorDetails()
        self.method = method

    @property
    def retry_delay_s(self) -> float | None:
        return self.details.retry_delay_s

    def __str__(self) -> str:
        parts = [f"{self.code.name}: {self.message}"]
        for violation in self.details.field_violations:
            if violation.field not in self.message:
                parts.append(f"{violation.field}: {violation.description}")
        for quota in self.details.quota_violations:
            parts.append(f"quota {quota.subject}: {quota.description}")
        if self.details.retry_delay_s is not None:
            parts.append(f"retry after {self.details.retry_delay_s:g}s")
        if self.request_id:
            parts.append(f"request id {self.request_id}")
        return "; ".join(parts)


class Cancelled(OrchestratorError):
    code = grpc.StatusCode.CANCELLED


class Unknown(OrchestratorError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(OrchestratorError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(OrchestratorError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(OrchestratorError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(OrchestratorError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(OrchestratorError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(OrchestratorError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(OrchestratorError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(OrchestratorError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(OrchestratorError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(OrchestratorError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(OrchestratorError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(OrchestratorError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(OrchestratorError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(OrchestratorError):
    code = grpc.StatusCode.UNAUTHENTICATED


class HistoryTruncatedError(OrchestratorError):
    """A resumed stream's cursor is older than what the session's log retains: the events
    between ``requested_after`` and ``oldest_retained`` are gone. Raised by streams opened with
    ``on_truncated="raise"`` (the default); ``"yield"`` yields the event instead."""

    code = grpc.StatusCode.OUT_OF_RANGE

    def __init__(self, session_id: str, requested_after: int, oldest_retained: int) -> None:
        super().__init__(
            f"session {session_id}: events after {requested_after} up to "
            f"{oldest_retained - 1} are no longer retained"
        )
        self.session_id = session_id
        self.requested_after = requested_after
        self.oldest_retained = oldest_retained


_BY_CODE: dict[grpc.StatusCode, type[OrchestratorError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def _pairs(metadata: Any) -> list[tuple[str, Any]]:
    if not metadata:
        return []
    return [(str(k).lower(), v) for k, v in metadata]


def metadata_value(metadata: Iterable[tuple[str, Any]] | None, key: str) -> Any:
    """The first value of ``key`` in call metadata (None when absent)."""
    for k, v in _pairs(metadata):
        if k == key:
            return v
    return None


def request_id_of(headers: Any, trailers: Any) -> str:
    """The x-request-id the server returned, from the response headers or the trailers."""
    for source in (headers, trailers):
        value = metadata_value(source, REQUEST_ID_HEADER)
        if value:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def parse_details(trailers: Any) -> ErrorDetails:
    """The google.rpc details in a failed call's trailers (grpc-status-details-bin), with the
    retry-after trailer as the retry delay when no RetryInfo came."""
    violations: list[FieldViolation] = []
    quotas: list[QuotaViolation] = []
    retry_delay: float | None = None
    reason = domain = ""
    error_metadata: dict[str, str] = {}
    raw = metadata_value(trailers, STATUS_DETAILS_KEY)
    if isinstance(raw, bytes):
        status = status_pb2.Status()
        try:
            status.ParseFromString(raw)
        except Exception:  # an undecodable status: keep what the call said
            status = status_pb2.Status()
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
            elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                quota = error_details_pb2.QuotaFailure()
                detail.Unpack(quota)
                quotas += [QuotaViolation(v.subject, v.description) for v in quota.violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                retry_delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                error_info = error_details_pb2.ErrorInfo()
                detail.Unpack(error_info)
                reason, domain = error_info.reason, error_info.domain
                error_metadata = dict(error_info.metadata)
    if retry_delay is None:
        after = metadata_value(trailers, RETRY_AFTER_HEADER)
        if after is not None:
            try:
                retry_delay = float(after.decode() if isinstance(after, bytes) else after)
            except ValueError:
                retry_delay = None
    return ErrorDetails(
        tuple(violations), tuple(quotas), retry_delay, reason, domain, error_metadata
    )


def from_rpc_error(error: grpc.RpcError, method: str = "") -> OrchestratorError:
    """The typed exception for a failed call."""
    code: grpc.StatusCode = error.code()
    message: str = error.details() or code.name
    headers = getattr(error, "initial_metadata", lambda: None)()
    trailers = getattr(error, "trailing_metadata", lambda: None)()
    cls = _BY_CODE.get(code, OrchestratorError)
    return cls(
        message,
        code=code,
        request_id=request_id_of(headers, trailers),
        details=parse_details(trailers),
        method=method,
    )

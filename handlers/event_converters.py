"""Protobuf <-> domain conversions of the job flow: chat requests, events and notices."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format, struct_pb2

from domain.jobs import EventKind, NoticeEvent, SessionEvent, unreadable_event
from domain.models import Service, TokenUsage, WorkKind
from domain.notices import MAX_RESULT_DEPTH, NoticeInput, check_json_tree
from handlers.converters import (
    enum_from_pb,
    enum_to_pb,
    inverse,
    timestamp_from_ms,
    usage_from_pb,
    usage_to_pb,
)
from orchestrator.v1 import chat_pb2, common_pb2, task_update_pb2

log = logging.getLogger(__name__)

KIND_TO_PB = enum_to_pb(WorkKind, common_pb2.WorkKind, "WORK_KIND_")
_KIND_FROM_PB = {common_pb2.WORK_KIND_UNSPECIFIED: WorkKind.LLM_QUERY, **inverse(KIND_TO_PB)}
# Only these services have a value in orchestrator.v1.Service (the plans' services do not).
SERVICE_TO_PB = enum_to_pb(
    Service, common_pb2.Service, "SERVICE_", (Service.QUERY, Service.EMBEDDING)
)
_SERVICE_FROM_PB = inverse(SERVICE_TO_PB)
_NOTICE_FROM_PB = inverse(enum_to_pb(NoticeEvent, task_update_pb2.NoticeEvent, "NOTICE_EVENT_"))


def work_kind_from_pb(kind: common_pb2.WorkKind.ValueType) -> WorkKind:
    return enum_from_pb(_KIND_FROM_PB, kind, "kind", "work kind")


def service_from_pb(service: common_pb2.Service.ValueType) -> Service | None:
    return _SERVICE_FROM_PB.get(service)


# -- results, errors and usage as plain data (SessionEvent.data) ---------------------------------


def result_to_data(result: common_pb2.JobResult) -> dict[str, Any]:
    data: dict[str, Any] = {"text": result.text, "model": result.model}
    if result.embeddings:
        data["embeddings"] = [list(v.values) for v in result.embeddings]
    if result.HasField("data"):
        data["data"] = json_format.MessageToDict(result.data)
    return data


def result_from_data(data: Mapping[str, Any]) -> common_pb2.JobResult:
    """The stored result as protobuf. Raises ValueError for one protobuf cannot carry (nested
    beyond domain.notices.MAX_RESULT_DEPTH, non-finite numbers), which an older release may
    have stored."""
    check_json_tree("result", data, MAX_RESULT_DEPTH, ValueError)
    result = common_pb2.JobResult(text=str(data.get("text", "")), model=str(data.get("model", "")))
    for values in data.get("embeddings") or ():
        result.embeddings.add(values=[float(v) for v in values])
    extra = data.get("data")
    if isinstance(extra, Mapping) and extra:
        struct = struct_pb2.Struct()
        struct.update(extra)
        result.data.CopyFrom(struct)
    return result


def usage_to_data(usage: TokenUsage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def usage_from_data(data: Mapping[str, Any] | None) -> TokenUsage:
    data = data or {}
    return TokenUsage(
        int(data.get("prompt_tokens", 0)),
        int(data.get("completion_tokens", 0)),
        int(data.get("total_tokens", 0)),
    )


def error_to_data(error: common_pb2.JobError) -> dict[str, Any]:
    return {
        "code": error.code or "unknown",
        "message": error.message,
        "retryable": error.retryable,
    }


# -- events ------------------------------------------------------------------------------------


def event_to_pb(event: SessionEvent) -> chat_pb2.ChatEvent:
    pb = chat_pb2.ChatEvent(
        session_id=event.session_id,
        job_id=event.job_id,
        sequence=event.sequence,
        time=timestamp_from_ms(event.time_ms),
        request_id=event.request_id,
    )
    data = event.data
    kind = event.kind
    if kind is EventKind.ACCEPTED:
        pb.accepted.CopyFrom(
            chat_pb2.JobAccepted(
                service=SERVICE_TO_PB[Service(data["service"])],
                kind=KIND_TO_PB[WorkKind(data["kind"])],
                content=data.get("content", ""),
                deadline=timestamp_from_ms(int(data["deadline_ms"])),
                queued=bool(data.get("queued", False)),
            )
        )
    elif kind is EventKind.PROGRESS:
        pb.progress.CopyFrom(
            chat_pb2.JobProgress(
                fraction=float(data.get("fraction", 0.0)), message=data.get("message", "")
            )
        )
    elif kind is EventKind.DELTA:
        pb.delta.CopyFrom(chat_pb2.TextDelta(text=data.get("text", "")))
    elif kind is EventKind.COMPLETED:
        pb.completed.CopyFrom(
            chat_pb2.JobCompleted(
                result=result_from_data(data.get("result") or {}),
                usage=usage_to_pb(usage_from_data(data.get("usage"))),
            )
        )
    elif kind is EventKind.FAILED:
        error = data.get("error") or {}
        pb.failed.CopyFrom(
            chat_pb2.JobFailed(
                error=common_pb2.JobError(
                    code=str(error.get("code", "unknown")),
                    message=str(error.get("message", "")),
                    retryable=bool(error.get("retryable", False)),
                )
            )
        )
    elif kind is EventKind.TIMED_OUT:
        pb.timed_out.CopyFrom(
            chat_pb2.JobTimedOut(deadline=timestamp_from_ms(int(data["deadline_ms"])))
        )
    elif kind is EventKind.CANCELLED:
        pb.cancelled.CopyFrom(chat_pb2.JobCancelled(reason=data.get("reason", "")))
    else:
        pb.history_truncated.CopyFrom(
            chat_pb2.HistoryTruncated(
                requested_after_sequence=int(data["requested_after"]),
                oldest_retained_sequence=int(data["oldest_retained"]),
            )
        )
    return pb


def sendable_event(event: SessionEvent) -> chat_pb2.ChatEvent | None:
    """The ChatEvent clients get for ``event``, None for one they do not see. A stored event
    that cannot be converted never ends a stream: a final one is sent as a failure of its job
    (code ``unreadable_event``, so its followers still see it end), any other is skipped; a
    WARNING names it. Unreadable events were logged when read."""
    if event.kind is EventKind.UNREADABLE:
        return None
    try:
        return event_to_pb(event)
    except Exception as exc:  # KeyError, ValueError, protobuf's DecodeError, ...: bad data
        reason = f"{type(exc).__name__}: {exc}"[:200]
    final = event.kind.is_final and bool(event.job_id)
    log.warning(
        "session %s event %d (%s of job %s) cannot be sent (%s); %s",
        event.session_id,
        event.sequence,
        event.kind.value,
        event.job_id or "-",
        reason,
        "sent as a failure of the job" if final else "skipped",
    )
    if not final:
        return None
    return event_to_pb(
        unreadable_event(
            event.session_id,
            event.sequence,
            event.time_ms,
            event.job_id,
            event.kind.value,
            "its data cannot be converted",
        )
    )


# -- notices -----------------------------------------------------------------------------------


def notice_from_pb(request: task_update_pb2.PublishUpdatesRequest) -> NoticeInput:
    event = _NOTICE_FROM_PB.get(request.event)
    data: dict[str, Any]
    usage = TokenUsage()
    if event is NoticeEvent.PROGRESS:
        data = {"fraction": request.progress, "message": request.status_message}
    elif event is NoticeEvent.DELTA:
        data = {"text": request.delta}
    elif event is NoticeEvent.COMPLETED:
        usage = usage_from_pb(request.usage)
        try:
            result = result_to_data(request.result)
        except ValueError:  # NaN or infinity in result.data: not JSON
            return NoticeInput.malformed_frame(
                "result: holds a value that is not finite JSON data", request.job_id
            )
        data = {"result": result, "usage": usage_to_data(usage)}
    elif event is NoticeEvent.FAILED:
        data = {"error": error_to_data(request.error)}
    else:
        data = {}
    return NoticeInput(
        event=event,
        service=service_from_pb(request.service),
        job_id=request.job_id,
        tenant_id=request.tenant_id,
        sequence=request.sequence,
        agent_id=request.agent_id,
        data=data,
        usage=usage,
    )

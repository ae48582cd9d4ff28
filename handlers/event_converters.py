"""Protobuf <-> domain conversions of the job flow: chat requests, events and notices."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format, struct_pb2

from domain.jobs import EventKind, NoticeEvent, SessionEvent, StepPhase, unreadable_event
from domain.models import Service, TokenUsage, WorkKind
from domain.notices import MAX_RESULT_DEPTH, NoticeInput, check_json_tree
from domain.plans import StepState
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
SERVICE_TO_PB = enum_to_pb(Service, common_pb2.Service, "SERVICE_")
_SERVICE_FROM_PB = inverse(SERVICE_TO_PB)
_NOTICE_FROM_PB = inverse(enum_to_pb(NoticeEvent, task_update_pb2.NoticeEvent, "NOTICE_EVENT_"))
PHASE_TO_PB = enum_to_pb(StepPhase, common_pb2.StepPhase, "STEP_PHASE_")
_PHASE_FROM_PB = inverse(PHASE_TO_PB)
PLAN_STEP_STATE_TO_PB = enum_to_pb(StepState, common_pb2.PlanStepState, "PLAN_STEP_STATE_")


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


def error_from_data(error: Mapping[str, Any], missing_code: str = "unknown") -> common_pb2.JobError:
    """Error data as a JobError (``missing_code`` when the data names no code)."""
    return common_pb2.JobError(
        code=str(error.get("code", missing_code)),
        message=str(error.get("message", "")),
        retryable=bool(error.get("retryable", False)),
    )


def tool_call_to_data(call: common_pb2.ToolCall) -> dict[str, Any]:
    """A ToolCall as tool_call event data (``phase`` "" when unset: malformed)."""
    return {
        "call_id": call.call_id,
        "name": call.name,
        "phase": _phase_to_data(call.phase),
        "arguments": call.arguments_json,
        "result_summary": call.result_summary,
        **_error_to_data(call),
    }


def tool_call_from_data(data: Mapping[str, Any]) -> common_pb2.ToolCall:
    call = common_pb2.ToolCall(
        call_id=str(data.get("call_id", "")),
        name=str(data.get("name", "")),
        phase=PHASE_TO_PB[StepPhase(data["phase"])],
        arguments_json=str(data.get("arguments", "")),
        result_summary=str(data.get("result_summary", "")),
    )
    _copy_error(data, call.error)
    return call


def step_to_data(step: common_pb2.WorkflowStep) -> dict[str, Any]:
    """A WorkflowStep as workflow_step event data (``phase`` "" when unset: malformed)."""
    return {
        "step_id": step.step_id,
        "name": step.name,
        "index": step.index,
        "phase": _phase_to_data(step.phase),
        "summary": step.summary,
        **_error_to_data(step),
    }


def step_from_data(data: Mapping[str, Any]) -> common_pb2.WorkflowStep:
    step = common_pb2.WorkflowStep(
        step_id=str(data.get("step_id", "")),
        name=str(data.get("name", "")),
        index=int(data.get("index", 0)),
        phase=PHASE_TO_PB[StepPhase(data["phase"])],
        summary=str(data.get("summary", "")),
    )
    _copy_error(data, step.error)
    return step


def _phase_to_data(phase: common_pb2.StepPhase.ValueType) -> str:
    """A StepPhase as event data: its domain value, "" when unset (malformed)."""
    known = _PHASE_FROM_PB.get(phase)
    return known.value if known else ""


def _error_to_data(message: common_pb2.ToolCall | common_pb2.WorkflowStep) -> dict[str, Any]:
    """``{"error": ...}`` when ``message`` carries an error, else nothing."""
    return {"error": error_to_data(message.error)} if message.HasField("error") else {}


def _copy_error(data: Mapping[str, Any], into: common_pb2.JobError) -> None:
    """The event data's ``error`` (when it has one) into ``into``."""
    error = data.get("error")
    if isinstance(error, Mapping):
        into.CopyFrom(error_from_data(error))


def plan_step_from_data(data: Mapping[str, Any]) -> common_pb2.PlanStep:
    """plan_step event data (domain.jobs.SessionEvent) as a PlanStep."""
    step = common_pb2.PlanStep(
        index=int(data.get("index", 0)),
        name=str(data["name"]),
        service=SERVICE_TO_PB[Service(data["service"])],
        method=str(data.get("method", "")),
        state=PLAN_STEP_STATE_TO_PB[StepState(data["state"])],
        attempts=int(data.get("attempts", 0)),
    )
    if data.get("started_ms"):
        step.started.CopyFrom(timestamp_from_ms(int(data["started_ms"])))
    if data.get("ended_ms"):
        step.ended.CopyFrom(timestamp_from_ms(int(data["ended_ms"])))
    _copy_error(data, step.error)
    return step


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
        pb.failed.CopyFrom(chat_pb2.JobFailed(error=error_from_data(data.get("error") or {})))
    elif kind is EventKind.TIMED_OUT:
        pb.timed_out.CopyFrom(
            chat_pb2.JobTimedOut(deadline=timestamp_from_ms(int(data["deadline_ms"])))
        )
    elif kind is EventKind.CANCELLED:
        pb.cancelled.CopyFrom(chat_pb2.JobCancelled(reason=data.get("reason", "")))
    elif kind is EventKind.TOOL_CALL:
        pb.tool_call.CopyFrom(tool_call_from_data(data))
    elif kind is EventKind.WORKFLOW_STEP:
        pb.workflow_step.CopyFrom(step_from_data(data))
    elif kind is EventKind.PLAN_STEP:
        pb.plan_step.CopyFrom(plan_step_from_data(data))
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
    elif event is NoticeEvent.TOOL_CALL:
        data = tool_call_to_data(request.tool_call) if request.HasField("tool_call") else {}
    elif event is NoticeEvent.STEP:
        data = step_to_data(request.step) if request.HasField("step") else {}
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

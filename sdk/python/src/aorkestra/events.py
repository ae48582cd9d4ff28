"""Typed chat events: one class per ``ChatEvent`` kind, each with the event's session, job,
sequence, time and request id, and the protobuf message as ``raw``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format

from aorkestra._proto.orchestrator.v1 import chat_pb2, common_pb2

FINAL_KINDS = frozenset({"completed", "failed", "timed_out", "cancelled"})


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, pb: common_pb2.TokenUsage) -> Usage:
        return cls(pb.prompt_tokens, pb.completion_tokens, pb.total_tokens)


@dataclass(frozen=True, slots=True)
class JobError:
    code: str
    message: str
    retryable: bool

    @classmethod
    def of(cls, pb: common_pb2.JobError) -> JobError:
        return cls(pb.code, pb.message, pb.retryable)


@dataclass(frozen=True, kw_only=True)
class Event:
    """Every event of a session, in ``sequence`` order (per session, increasing)."""

    kind: str
    session_id: str
    job_id: str
    sequence: int
    time: datetime | None
    request_id: str
    raw: chat_pb2.ChatEvent

    @property
    def final(self) -> bool:
        """The job's last event (completed, failed, timed_out or cancelled)."""
        return self.kind in FINAL_KINDS

    def to_dict(self) -> dict[str, Any]:
        """The event as JSON-ready data (protobuf JSON names, enums by name)."""
        return json_format.MessageToDict(self.raw, preserving_proto_field_name=True)


@dataclass(frozen=True, kw_only=True)
class Accepted(Event):
    service: str
    work_kind: str
    content: str
    queued: bool
    deadline: datetime | None


@dataclass(frozen=True, kw_only=True)
class Progress(Event):
    fraction: float
    message: str


@dataclass(frozen=True, kw_only=True)
class Delta(Event):
    text: str


@dataclass(frozen=True, kw_only=True)
class Completed(Event):
    text: str
    model: str
    usage: Usage
    embeddings: tuple[tuple[float, ...], ...]
    data: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Failed(Event):
    error: JobError


@dataclass(frozen=True, kw_only=True)
class TimedOut(Event):
    deadline: datetime | None


@dataclass(frozen=True, kw_only=True)
class Cancelled(Event):
    reason: str


@dataclass(frozen=True, kw_only=True)
class HistoryTruncated(Event):
    requested_after: int
    oldest_retained: int


@dataclass(frozen=True, kw_only=True)
class ToolCall(Event):
    call_id: str
    name: str
    phase: str  # started, finished, failed
    arguments_json: str
    result_summary: str
    error: JobError | None


@dataclass(frozen=True, kw_only=True)
class WorkflowStep(Event):
    step_id: str
    name: str
    index: int
    phase: str
    summary: str
    error: JobError | None


@dataclass(frozen=True, kw_only=True)
class PlanStep(Event):
    index: int
    name: str
    service: str
    method: str
    state: str  # pending, running, done, failed, skipped
    attempts: int
    error: JobError | None


@dataclass(frozen=True, kw_only=True)
class UnknownEvent(Event):
    """A kind this SDK version does not know (a newer server)."""


def _time(pb: Any, present: bool = True) -> datetime | None:
    if not present or (pb.seconds == 0 and pb.nanos == 0):
        return None
    return datetime.fromtimestamp(pb.seconds + pb.nanos / 1e9, tz=UTC)


def _enum(enum: Any, value: int, prefix: str) -> str:
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix).lower()


def _error(step: Any) -> JobError | None:
    """The error of a tool call, workflow step or plan step; None when it has none."""
    return JobError.of(step.error) if step.HasField("error") else None


def from_proto(pb: chat_pb2.ChatEvent) -> Event:
    """The typed event for a ChatEvent."""
    kind = pb.WhichOneof("kind") or "unknown"
    base: dict[str, Any] = {
        "kind": kind,
        "session_id": pb.session_id,
        "job_id": pb.job_id,
        "sequence": pb.sequence,
        "time": _time(pb.time, pb.HasField("time")),
        "request_id": pb.request_id,
        "raw": pb,
    }
    if kind == "accepted":
        a = pb.accepted
        return Accepted(
            **base,
            service=_enum(common_pb2.Service, a.service, "SERVICE_"),
            work_kind=_enum(common_pb2.WorkKind, a.kind, "WORK_KIND_"),
            content=a.content,
            queued=a.queued,
            deadline=_time(a.deadline, a.HasField("deadline")),
        )
    if kind == "progress":
        return Progress(**base, fraction=pb.progress.fraction, message=pb.progress.message)
    if kind == "delta":
        return Delta(**base, text=pb.delta.text)
    if kind == "completed":
        c = pb.completed
        return Completed(
            **base,
            text=c.result.text,
            model=c.result.model,
            usage=Usage.of(c.usage),
            embeddings=tuple(tuple(v.values) for v in c.result.embeddings),
            data=json_format.MessageToDict(c.result.data) if c.result.HasField("data") else {},
        )
    if kind == "failed":
        return Failed(**base, error=JobError.of(pb.failed.error))
    if kind == "timed_out":
        timed_out = pb.timed_out
        return TimedOut(**base, deadline=_time(timed_out.deadline, timed_out.HasField("deadline")))
    if kind == "cancelled":
        return Cancelled(**base, reason=pb.cancelled.reason)
    if kind == "history_truncated":
        h = pb.history_truncated
        return HistoryTruncated(
            **base,
            requested_after=h.requested_after_sequence,
            oldest_retained=h.oldest_retained_sequence,
        )
    if kind == "tool_call":
        t = pb.tool_call
        return ToolCall(
            **base,
            call_id=t.call_id,
            name=t.name,
            phase=_enum(common_pb2.StepPhase, t.phase, "STEP_PHASE_"),
            arguments_json=t.arguments_json,
            result_summary=t.result_summary,
            error=_error(t),
        )
    if kind == "workflow_step":
        w = pb.workflow_step
        return WorkflowStep(
            **base,
            step_id=w.step_id,
            name=w.name,
            index=w.index,
            phase=_enum(common_pb2.StepPhase, w.phase, "STEP_PHASE_"),
            summary=w.summary,
            error=_error(w),
        )
    if kind == "plan_step":
        p = pb.plan_step
        return PlanStep(
            **base,
            index=p.index,
            name=p.name,
            service=_enum(common_pb2.Service, p.service, "SERVICE_"),
            method=p.method,
            state=_enum(common_pb2.PlanStepState, p.state, "PLAN_STEP_STATE_"),
            attempts=p.attempts,
            error=_error(p),
        )
    return UnknownEvent(**base)

"""The notice and event contract of agent work: tool calls, workflow steps, plan steps and
agent_changed, from protobuf and from JSON to the domain and back to ChatEvents, with every
bound of every new field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from domain.jobs import EventKind, NoticeEvent, SessionEvent
from domain.models import Service
from domain.notices import (
    MAX_AGENT_ID_CHARS,
    MAX_ARGUMENTS_CHARS,
    MAX_CALL_ID_CHARS,
    MAX_ERROR_CODE_CHARS,
    MAX_ERROR_MESSAGE_CHARS,
    MAX_RESULT_DEPTH,
    MAX_STEP_ID_CHARS,
    MAX_STEP_INDEX,
    MAX_STEP_NAME_CHARS,
    MAX_SUMMARY_CHARS,
    MAX_TOOL_NAME_CHARS,
    AgentChange,
    MalformedNotice,
    NoticeInput,
    validate_agent_change,
    validate_notice,
)
from handlers.event_converters import event_to_pb, notice_from_pb, sendable_event
from handlers.ws_notices import NoticeShapeError, notice_from_json
from orchestrator.v1 import common_pb2, task_update_pb2

JOB = "0190a0b0-0000-7000-8000-000000000001"


def tool_call_pb(**fields: Any) -> task_update_pb2.PublishUpdatesRequest:
    call: dict[str, Any] = {
        "call_id": "call-1",
        "name": "calculator",
        "phase": common_pb2.STEP_PHASE_FINISHED,
        "arguments_json": '{"expression": "2+3"}',
        "result_summary": "5",
    }
    call.update(fields)
    return task_update_pb2.PublishUpdatesRequest(
        event=task_update_pb2.NOTICE_EVENT_TOOL_CALL,
        service=common_pb2.SERVICE_AGENT_EXECUTION,
        job_id=JOB,
        tenant_id="acme",
        sequence=2,
        tool_call=common_pb2.ToolCall(**call),
    )


def step_pb(**fields: Any) -> task_update_pb2.PublishUpdatesRequest:
    step: dict[str, Any] = {
        "step_id": "retrieve",
        "name": "Retrieve passages",
        "index": 0,
        "phase": common_pb2.STEP_PHASE_STARTED,
        "summary": "",
    }
    step.update(fields)
    return task_update_pb2.PublishUpdatesRequest(
        event=task_update_pb2.NOTICE_EVENT_STEP,
        service=common_pb2.SERVICE_WORKFLOW_ENGINE,
        job_id=JOB,
        tenant_id="acme",
        sequence=1,
        step=common_pb2.WorkflowStep(**step),
    )


def error(code: str = "tool_error", message: str = "division by zero") -> common_pb2.JobError:
    return common_pb2.JobError(code=code, message=message, retryable=False)


def malformed(raw: NoticeInput) -> str:
    with pytest.raises(MalformedNotice) as caught:
        validate_notice(raw)
    return str(caught.value)


# -- tool calls ---------------------------------------------------------------------------


def test_a_tool_call_notice_becomes_tool_call_data() -> None:
    notice = validate_notice(notice_from_pb(tool_call_pb()))
    assert (notice.event, notice.service, notice.sequence) == (
        NoticeEvent.TOOL_CALL,
        Service.AGENT_EXECUTION,
        2,
    )
    assert notice.data == {
        "call_id": "call-1",
        "name": "calculator",
        "phase": "finished",
        "arguments": '{"expression": "2+3"}',
        "result_summary": "5",
    }


def test_a_failed_tool_call_carries_its_error() -> None:
    notice = validate_notice(
        notice_from_pb(tool_call_pb(phase=common_pb2.STEP_PHASE_FAILED, error=error()))
    )
    assert notice.data["error"] == {
        "code": "tool_error",
        "message": "division by zero",
        "retryable": False,
    }


def too_deep(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        ({"call_id": ""}, "tool_call.call_id: is required"),
        ({"call_id": "c" * (MAX_CALL_ID_CHARS + 1)}, "tool_call.call_id: longer than"),
        ({"name": ""}, "tool_call.name: is required"),
        ({"name": "n" * (MAX_TOOL_NAME_CHARS + 1)}, "tool_call.name: longer than"),
        ({"phase": common_pb2.STEP_PHASE_UNSPECIFIED}, "tool_call.phase: must be one of"),
        ({"phase": 99}, "tool_call.phase: must be one of"),
        ({"arguments_json": "{not json"}, "tool_call.arguments: must be JSON text"),
        ({"arguments_json": "NaN"}, "tool_call.arguments: holds a value that is not finite"),
        (
            {"arguments_json": " " * (MAX_ARGUMENTS_CHARS + 1)},
            "tool_call.arguments: longer than",
        ),
        (
            {"arguments_json": too_deep(MAX_RESULT_DEPTH + 1)},
            "tool_call.arguments: nested deeper than",
        ),
        (
            {"result_summary": "r" * (MAX_SUMMARY_CHARS + 1)},
            "tool_call.result_summary: longer than",
        ),
        ({"phase": common_pb2.STEP_PHASE_FAILED}, "tool_call.error: is required"),
        (
            {"error": error(code="c" * (MAX_ERROR_CODE_CHARS + 1))},
            "tool_call.error.code: longer than",
        ),
        (
            {"error": error(message="m" * (MAX_ERROR_MESSAGE_CHARS + 1))},
            "tool_call.error.message: longer than",
        ),
    ],
)
def test_every_tool_call_field_is_bounded(fields: dict[str, Any], detail: str) -> None:
    assert detail in malformed(notice_from_pb(tool_call_pb(**fields)))


def test_the_bounds_themselves_pass() -> None:
    validate_notice(
        notice_from_pb(
            tool_call_pb(
                call_id="c" * MAX_CALL_ID_CHARS,
                name="n" * MAX_TOOL_NAME_CHARS,
                arguments_json=" " * (MAX_ARGUMENTS_CHARS - 2) + "{}",
                result_summary="r" * MAX_SUMMARY_CHARS,
            )
        )
    )
    validate_notice(
        notice_from_pb(
            step_pb(
                step_id="s" * MAX_STEP_ID_CHARS,
                name="n" * MAX_STEP_NAME_CHARS,
                index=MAX_STEP_INDEX,
                summary="x" * MAX_SUMMARY_CHARS,
            )
        )
    )
    validate_notice(notice_from_pb(tool_call_pb(arguments_json=too_deep(MAX_RESULT_DEPTH))))


def test_a_tool_call_notice_without_its_tool_call_is_malformed() -> None:
    request = tool_call_pb()
    request.ClearField("tool_call")
    assert "tool_call: is required" in malformed(notice_from_pb(request))


# -- workflow steps -----------------------------------------------------------------------


def test_a_step_notice_becomes_workflow_step_data() -> None:
    notice = validate_notice(notice_from_pb(step_pb(index=2, summary="3 passages")))
    assert (notice.event, notice.service) == (NoticeEvent.STEP, Service.WORKFLOW_ENGINE)
    assert notice.data == {
        "step_id": "retrieve",
        "name": "Retrieve passages",
        "index": 2,
        "phase": "started",
        "summary": "3 passages",
    }


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        ({"step_id": ""}, "step.step_id: is required"),
        ({"step_id": "s" * (MAX_STEP_ID_CHARS + 1)}, "step.step_id: longer than"),
        ({"name": ""}, "step.name: is required"),
        ({"name": "n" * (MAX_STEP_NAME_CHARS + 1)}, "step.name: longer than"),
        ({"index": -1}, "step.index: must be a whole number from 0"),
        ({"index": MAX_STEP_INDEX + 1}, "step.index: must be a whole number from 0"),
        ({"phase": common_pb2.STEP_PHASE_UNSPECIFIED}, "step.phase: must be one of"),
        ({"summary": "x" * (MAX_SUMMARY_CHARS + 1)}, "step.summary: longer than"),
        ({"phase": common_pb2.STEP_PHASE_FAILED}, "step.error: is required"),
        (
            {"phase": common_pb2.STEP_PHASE_FAILED, "error": error(code="c" * 999)},
            "step.error.code: longer than",
        ),
    ],
)
def test_every_step_field_is_bounded(fields: dict[str, Any], detail: str) -> None:
    assert detail in malformed(notice_from_pb(step_pb(**fields)))


def test_a_step_notice_without_its_step_is_malformed() -> None:
    request = step_pb()
    request.ClearField("step")
    assert "step: is required" in malformed(notice_from_pb(request))


# -- agent_changed ------------------------------------------------------------------------


def agent_changed_pb(**fields: Any) -> task_update_pb2.PublishUpdatesRequest:
    values: dict[str, Any] = {
        "event": task_update_pb2.NOTICE_EVENT_AGENT_CHANGED,
        "service": common_pb2.SERVICE_AGENT_MANAGEMENT,
        "tenant_id": "acme",
        "agent_id": "support-bot",
    }
    values.update(fields)
    return task_update_pb2.PublishUpdatesRequest(**values)


def test_agent_changed_names_the_tenant_and_agent() -> None:
    raw = notice_from_pb(agent_changed_pb())
    assert raw.event is NoticeEvent.AGENT_CHANGED
    assert validate_agent_change(raw) == AgentChange("acme", "support-bot")


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        ({"service": common_pb2.SERVICE_QUERY}, "service: agent_changed comes from"),
        ({"service": common_pb2.SERVICE_UNSPECIFIED}, "service: agent_changed comes from"),
        ({"job_id": JOB}, "job_id: must be empty"),
        ({"tenant_id": ""}, "tenant_id: is required"),
        ({"tenant_id": "no spaces allowed"}, "tenant_id: is not a valid tenant id"),
        ({"agent_id": ""}, "agent_id: is required"),
        ({"agent_id": "a" * (MAX_AGENT_ID_CHARS + 1)}, "agent_id: longer than"),
    ],
)
def test_a_bad_agent_changed_is_malformed(fields: dict[str, Any], detail: str) -> None:
    with pytest.raises(MalformedNotice) as caught:
        validate_agent_change(notice_from_pb(agent_changed_pb(**fields)))
    assert detail in str(caught.value)


def test_agent_changed_is_never_a_job_notice() -> None:
    raw = notice_from_pb(agent_changed_pb(job_id=JOB, sequence=1))
    assert "agent_changed is not about a job" in malformed(raw)


# -- JSON (the WebSocket bridge) ----------------------------------------------------------


def from_json(message: dict[str, Any]) -> NoticeInput:
    return notice_from_json(json.loads(json.dumps(message)))


def test_a_json_tool_call_with_structured_arguments() -> None:
    raw = from_json(
        {
            "event": "tool_call",
            "service": "agent_execution",
            "job_id": JOB,
            "tenant_id": "acme",
            "sequence": 3,
            "tool_call": {
                "call_id": "c-9",
                "name": "clock",
                "phase": "failed",
                "arguments": {"zone": "UTC", "precise": True},
                "error": {"code": "timeout", "message": "slow clock", "retryable": True},
            },
        }
    )
    notice = validate_notice(raw)
    assert notice.event is NoticeEvent.TOOL_CALL
    assert notice.data == {
        "call_id": "c-9",
        "name": "clock",
        "phase": "failed",
        "arguments": '{"zone":"UTC","precise":true}',
        "result_summary": "",
        "error": {"code": "timeout", "message": "slow clock", "retryable": True},
    }


def test_json_arguments_may_come_as_json_text() -> None:
    raw = from_json(
        {
            "event": "job_tool_call",
            "service": "agent_execution",
            "job_id": JOB,
            "tenant_id": "acme",
            "tool_call": {"call_id": "c", "name": "n", "phase": "started", "arguments_json": "[1]"},
        }
    )
    assert validate_notice(raw).data["arguments"] == "[1]"


@pytest.mark.parametrize("event", ["step", "job_step", "workflow_step"])
def test_a_json_step(event: str) -> None:
    raw = from_json(
        {
            "event": event,
            "service": "workflow_engine",
            "job_id": JOB,
            "tenant_id": "acme",
            "step": {"step_id": "answer", "name": "Answer", "index": 2, "phase": "finished"},
        }
    )
    notice = validate_notice(raw)
    assert notice.event is NoticeEvent.STEP
    assert notice.data == {
        "step_id": "answer",
        "name": "Answer",
        "index": 2,
        "phase": "finished",
        "summary": "",
    }


@pytest.mark.parametrize(
    ("item", "detail"),
    [
        ({"call_id": 7, "name": "n", "phase": "started"}, "tool_call.call_id: must be text"),
        ({"call_id": "c", "name": ["n"], "phase": "started"}, "tool_call.name: must be text"),
        ({"call_id": "c", "name": "n", "phase": "begun"}, "tool_call.phase: must be one of"),
        ({"call_id": "c", "name": "n", "phase": ["started"]}, "tool_call.phase: must be one of"),
        (
            {"call_id": "c", "name": "n", "phase": "started", "arguments_json": 5},
            "tool_call.arguments: must be text",
        ),
        (
            {"call_id": "c", "name": "n", "phase": "started", "result_summary": {}},
            "tool_call.result_summary: must be text",
        ),
        (
            {"call_id": "c", "name": "n", "phase": "started", "arguments": float("inf")},
            "tool_call.arguments: holds a value that is not finite",
        ),
    ],
)
def test_bad_json_tool_call_fields_are_malformed(item: dict[str, Any], detail: str) -> None:
    raw = notice_from_json(
        {
            "event": "tool_call",
            "service": "agent_execution",
            "job_id": JOB,
            "tenant_id": "acme",
            "tool_call": item,
        }
    )
    assert detail in malformed(raw)


@pytest.mark.parametrize(
    ("item", "detail"),
    [
        ({"step_id": "s", "name": "n", "phase": "started", "index": "1"}, "step.index"),
        ({"step_id": "s", "name": "n", "phase": "started", "index": 1.5}, "step.index"),
        ({"step_id": "s", "name": "n", "phase": "started", "index": True}, "step.index"),
        ({"step_id": "s", "name": "n", "phase": "started", "summary": 3}, "step.summary"),
        ({"step_id": None, "name": "n", "phase": "started"}, "step.step_id"),
    ],
)
def test_bad_json_step_fields_are_malformed(item: dict[str, Any], detail: str) -> None:
    raw = notice_from_json(
        {
            "event": "step",
            "service": "workflow_engine",
            "job_id": JOB,
            "tenant_id": "acme",
            "step": item,
        }
    )
    assert detail in malformed(raw)


@pytest.mark.parametrize("name", ["tool_call", "step"])
def test_a_json_work_item_that_is_not_an_object_is_refused(name: str) -> None:
    with pytest.raises(NoticeShapeError, match=f"{name}: must be an object"):
        notice_from_json({"event": name, "job_id": JOB, "tenant_id": "acme", name: "x"})


def test_a_json_agent_changed() -> None:
    raw = from_json(
        {
            "event": "agent_changed",
            "service": "agent_management",
            "tenant_id": "globex",
            "agent_id": "tool-bot",
        }
    )
    assert validate_agent_change(raw) == AgentChange("globex", "tool-bot")


# -- events -> ChatEvent ------------------------------------------------------------------


def event(kind: EventKind, data: dict[str, Any]) -> SessionEvent:
    return SessionEvent("s-1", JOB, 5, 1_700_000_000_000, kind, "req-1", data)


def test_a_tool_call_event_round_trips_to_the_chat_event() -> None:
    notice = validate_notice(
        notice_from_pb(tool_call_pb(phase=common_pb2.STEP_PHASE_FAILED, error=error()))
    )
    pb = event_to_pb(event(EventKind.TOOL_CALL, dict(notice.data)))
    assert pb.WhichOneof("kind") == "tool_call"
    assert pb.tool_call == common_pb2.ToolCall(
        call_id="call-1",
        name="calculator",
        phase=common_pb2.STEP_PHASE_FAILED,
        arguments_json='{"expression": "2+3"}',
        result_summary="5",
        error=error(),
    )


def test_a_workflow_step_event_round_trips_to_the_chat_event() -> None:
    notice = validate_notice(notice_from_pb(step_pb(index=1, summary="ok")))
    pb = event_to_pb(event(EventKind.WORKFLOW_STEP, dict(notice.data)))
    assert pb.WhichOneof("kind") == "workflow_step"
    assert pb.workflow_step == common_pb2.WorkflowStep(
        step_id="retrieve",
        name="Retrieve passages",
        index=1,
        phase=common_pb2.STEP_PHASE_STARTED,
        summary="ok",
    )
    assert not pb.workflow_step.HasField("error")


def test_a_plan_step_event_becomes_a_plan_step() -> None:
    data = {
        "index": 1,
        "name": "load_history",
        "service": "conversation",
        "method": "ListHistory",
        "state": "failed",
        "attempts": 3,
        "started_ms": 1_700_000_000_100,
        "ended_ms": 1_700_000_000_900,
        "error": {"code": "step_failed", "message": "load_history (conversation): down"},
    }
    pb = event_to_pb(event(EventKind.PLAN_STEP, data))
    assert pb.WhichOneof("kind") == "plan_step"
    step = pb.plan_step
    assert (step.index, step.name, step.method, step.attempts) == (
        1,
        "load_history",
        "ListHistory",
        3,
    )
    assert step.service == common_pb2.SERVICE_CONVERSATION
    assert step.state == common_pb2.PLAN_STEP_STATE_FAILED
    assert step.started.ToMilliseconds() == 1_700_000_000_100
    assert step.ended.ToMilliseconds() == 1_700_000_000_900
    assert step.error.code == "step_failed"


def test_a_pending_plan_step_has_no_times_and_no_error() -> None:
    data = {
        "index": 0,
        "name": "run",
        "service": "agent_execution",
        "method": "StartRun",
        "state": "pending",
        "attempts": 0,
    }
    step = event_to_pb(event(EventKind.PLAN_STEP, data)).plan_step
    assert step.state == common_pb2.PLAN_STEP_STATE_PENDING
    assert step.service == common_pb2.SERVICE_AGENT_EXECUTION
    assert not step.HasField("started") and not step.HasField("ended")
    assert not step.HasField("error")


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        (EventKind.PLAN_STEP, {"name": "run", "service": "nowhere", "state": "done"}),
        (EventKind.PLAN_STEP, {"name": "run", "service": "query", "state": "sleeping"}),
        (EventKind.TOOL_CALL, {"call_id": "c", "phase": "begun"}),
        (EventKind.WORKFLOW_STEP, {"step_id": "s"}),
    ],
)
def test_an_unconvertible_agent_work_event_is_skipped(
    kind: EventKind, data: dict[str, Any]
) -> None:
    assert sendable_event(event(kind, data)) is None


@pytest.mark.parametrize("service", list(Service))
def test_an_accepted_event_names_every_service(service: Service) -> None:
    data = {"service": service.value, "kind": "llm_query", "deadline_ms": 1}
    pb = event_to_pb(event(EventKind.ACCEPTED, data))
    assert common_pb2.Service.Name(pb.accepted.service) == f"SERVICE_{service.name}"

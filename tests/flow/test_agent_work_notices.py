"""Agent work over real gRPC (PublishUpdates) and the WebSocket bridge, on both backends: tool
call and workflow step notices keep a job running and reach the client as ChatEvents; bad input
on every new field is malformed naming it; agent_changed reaches the notice intake's hook."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from domain.jobs import JobState
from orchestrator.v1 import common_pb2, task_update_pb2
from tests.support.flow import Flow, completed, kind_of, notice, read_events, read_to_end


def tool_call(
    job_id: str, sequence: int, tenant_id: str = "acme", **fields: Any
) -> task_update_pb2.PublishUpdatesRequest:
    call: dict[str, Any] = {
        "call_id": "call-1",
        "name": "calculator",
        "phase": common_pb2.STEP_PHASE_STARTED,
        "arguments_json": '{"expression":"2+3"}',
    }
    call.update(fields)
    return notice(
        job_id, sequence, "tool_call", tenant_id=tenant_id, tool_call=common_pb2.ToolCall(**call)
    )


def step(
    job_id: str, sequence: int, tenant_id: str = "acme", **fields: Any
) -> task_update_pb2.PublishUpdatesRequest:
    values: dict[str, Any] = {
        "step_id": "retrieve",
        "name": "retrieve",
        "index": 0,
        "phase": common_pb2.STEP_PHASE_FINISHED,
        "summary": "3 passages",
    }
    values.update(fields)
    return notice(
        job_id, sequence, "step", tenant_id=tenant_id, step=common_pb2.WorkflowStep(**values)
    )


def agent_changed(**fields: Any) -> task_update_pb2.PublishUpdatesRequest:
    values: dict[str, Any] = {
        "event": task_update_pb2.NOTICE_EVENT_AGENT_CHANGED,
        "service": common_pb2.SERVICE_AGENT_MANAGEMENT,
        "tenant_id": "acme",
        "agent_id": "tool-bot",
    }
    values.update(fields)
    return task_update_pb2.PublishUpdatesRequest(**values)


async def test_tool_calls_and_steps_reach_the_client_and_keep_the_job_running(
    flow: Flow,
) -> None:
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    job_id = accepted.job_id
    reply = await flow.publish(
        [
            tool_call(job_id, 1),
            tool_call(
                job_id,
                2,
                phase=common_pb2.STEP_PHASE_FINISHED,
                result_summary="5",
                arguments_json="",
            ),
            step(job_id, 3),
        ]
    )
    assert (reply.received, reply.accepted) == (3, 3)
    started, finished, stepped = await read_events(call, 3)
    assert [kind_of(e) for e in (started, finished, stepped)] == [
        "tool_call",
        "tool_call",
        "workflow_step",
    ]
    assert started.tool_call == common_pb2.ToolCall(
        call_id="call-1",
        name="calculator",
        phase=common_pb2.STEP_PHASE_STARTED,
        arguments_json='{"expression":"2+3"}',
    )
    assert (finished.tool_call.phase, finished.tool_call.result_summary) == (
        common_pb2.STEP_PHASE_FINISHED,
        "5",
    )
    assert stepped.workflow_step == common_pb2.WorkflowStep(
        step_id="retrieve",
        name="retrieve",
        phase=common_pb2.STEP_PHASE_FINISHED,
        summary="3 passages",
    )
    assert stepped.job_id == job_id and stepped.sequence > finished.sequence > started.sequence
    job = await flow.running.server.backend.jobs.get_job("acme", job_id)
    assert job is not None
    assert (job.state, job.last_notice_sequence) == (JobState.RUNNING, 3)
    await flow.publish([completed(job_id, 4, "5")])
    (done,) = await read_to_end(call)
    assert kind_of(done) == "completed"


async def test_a_tool_call_about_another_tenants_job_is_wrong_tenant(flow: Flow) -> None:
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    reply = await flow.publish(
        [
            tool_call(accepted.job_id, 1, tenant_id="globex"),
            step(accepted.job_id, 1, tenant_id="globex"),
        ]
    )
    assert reply.rejected_wrong_tenant == 2
    await flow.publish([completed(accepted.job_id, 1, "x")])
    assert [kind_of(e) for e in await read_to_end(call)] == ["completed"]


BAD: list[tuple[dict[str, Any], str]] = [
    (dict(call_id=""), "tool_call.call_id"),
    (dict(call_id="c" * 129), "tool_call.call_id"),
    (dict(name=""), "tool_call.name"),
    (dict(name="n" * 129), "tool_call.name"),
    (dict(phase=common_pb2.STEP_PHASE_UNSPECIFIED), "tool_call.phase"),
    (dict(arguments_json="{oops"), "tool_call.arguments"),
    (dict(arguments_json="[" * 30 + "]" * 30), "tool_call.arguments"),
    (dict(result_summary="r" * 4097), "tool_call.result_summary"),
    (dict(phase=common_pb2.STEP_PHASE_FAILED), "tool_call.error"),
    (
        dict(error=common_pb2.JobError(code="c" * 129, message="m")),
        "tool_call.error.code",
    ),
    (
        dict(error=common_pb2.JobError(code="c", message="m" * 4097)),
        "tool_call.error.message",
    ),
]
BAD_STEPS: list[tuple[dict[str, Any], str]] = [
    (dict(step_id=""), "step.step_id"),
    (dict(name="n" * 129), "step.name"),
    (dict(index=-1), "step.index"),
    (dict(index=10_001), "step.index"),
    (dict(phase=common_pb2.STEP_PHASE_UNSPECIFIED), "step.phase"),
    (dict(summary="s" * 4097), "step.summary"),
    (dict(phase=common_pb2.STEP_PHASE_FAILED), "step.error"),
]


async def test_bad_input_on_every_new_field_is_malformed_naming_it(flow: Flow) -> None:
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    job_id = accepted.job_id
    requests = [tool_call(job_id, 1, **fields) for fields, _ in BAD]
    requests += [step(job_id, 1, **fields) for fields, _ in BAD_STEPS]
    empty_call = notice(job_id, 1, "tool_call")  # no tool_call at all
    empty_step = notice(job_id, 1, "step")
    reply = await flow.publish([*requests, empty_call, empty_step])
    expected = [name for _, name in BAD + BAD_STEPS] + ["tool_call", "step"]
    assert reply.rejected_malformed == len(expected) == reply.received
    for rejected, name in zip(reply.rejected, expected, strict=True):
        assert rejected.reason == task_update_pb2.REJECT_REASON_MALFORMED
        assert rejected.detail.startswith(f"{name}:"), (name, rejected.detail)
    # The job was not touched: its first notice is still sequence 1.
    await flow.publish([completed(job_id, 1, "fine")])
    assert [kind_of(e) for e in await read_to_end(call)] == ["completed"]


async def test_agent_changed_goes_to_the_hook(flow: Flow) -> None:
    changed: list[tuple[str, str]] = []

    async def hook(tenant_id: str, agent_id: str) -> None:
        changed.append((tenant_id, agent_id))

    flow.running.server.services.notices.on_agent_changed = hook
    reply = await flow.publish(
        [agent_changed(), agent_changed(tenant_id="globex", agent_id="support-bot")]
    )
    assert (reply.received, reply.accepted) == (2, 2)
    assert changed == [("acme", "tool-bot"), ("globex", "support-bot")]


async def test_agent_changed_without_a_hook_is_accepted_and_changes_nothing(flow: Flow) -> None:
    assert flow.running.server.services.notices.on_agent_changed is None
    reply = await flow.publish([agent_changed()])
    assert reply.accepted == 1


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        (dict(service=common_pb2.SERVICE_QUERY), "service:"),
        (dict(job_id="0190a0b0-0000-7000-8000-000000000001"), "job_id:"),
        (dict(tenant_id=""), "tenant_id:"),
        (dict(tenant_id="bad tenant"), "tenant_id:"),
        (dict(agent_id=""), "agent_id:"),
        (dict(agent_id="a" * 129), "agent_id:"),
    ],
)
async def test_a_bad_agent_changed_is_malformed_and_reaches_no_hook(
    flow: Flow, fields: dict[str, Any], detail: str
) -> None:
    changed: list[tuple[str, str]] = []

    async def hook(tenant_id: str, agent_id: str) -> None:
        changed.append((tenant_id, agent_id))

    flow.running.server.services.notices.on_agent_changed = hook
    reply = await flow.publish([agent_changed(**fields)])
    assert reply.rejected_malformed == 1
    assert reply.rejected[0].detail.startswith(detail)
    assert changed == []


# -- the WebSocket bridge --------------------------------------------------------------------


async def test_json_tool_calls_steps_and_agent_changes_over_the_socket(
    flow: Flow, ws: aiohttp.ClientWebSocketResponse
) -> None:
    changed: list[tuple[str, str]] = []

    async def hook(tenant_id: str, agent_id: str) -> None:
        changed.append((tenant_id, agent_id))

    flow.running.server.services.notices.on_agent_changed = hook
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    base = {"service": "query", "job_id": accepted.job_id, "tenant_id": "acme"}
    await ws.send_json(
        {
            **base,
            "event": "tool_call",
            "tool_call": {
                "call_id": "c-1",
                "name": "clock",
                "phase": "finished",
                "arguments": {"zone": "UTC"},
                "result_summary": "12:00",
            },
        }
    )
    assert (await ws.receive_json(timeout=5))["verdict"] == "accepted"
    await ws.send_json(
        {
            **base,
            "event": "step",
            "step": {"step_id": "s", "name": "summarize", "index": 1, "phase": "started"},
        }
    )
    assert (await ws.receive_json(timeout=5))["verdict"] == "accepted"
    await ws.send_json(
        {**base, "event": "step", "step": {"step_id": "s", "name": "x", "phase": "later"}}
    )
    bad = await ws.receive_json(timeout=5)
    assert bad["verdict"] == "malformed" and bad["detail"].startswith("step.phase:")
    await ws.send_json({**base, "event": "tool_call", "tool_call": ["not", "an", "object"]})
    assert (await ws.receive_json(timeout=5))["verdict"] == "malformed"
    await ws.send_json(
        {
            "event": "agent_changed",
            "service": "agent_management",
            "tenant_id": "acme",
            "agent_id": "research-flow",
        }
    )
    assert (await ws.receive_json(timeout=5))["verdict"] == "accepted"
    await ws.send_json({"event": "agent_changed", "service": "query", "tenant_id": "acme"})
    assert (await ws.receive_json(timeout=5))["verdict"] == "malformed"
    assert changed == [("acme", "research-flow")]
    tool, stepped = await read_events(call, 2)
    assert tool.tool_call.arguments_json == '{"zone":"UTC"}'
    assert tool.tool_call.result_summary == "12:00"
    assert (stepped.workflow_step.name, stepped.workflow_step.index) == ("summarize", 1)
    await flow.publish([completed(accepted.job_id, 3, "done")])  # after the two unnumbered
    assert [kind_of(e) for e in await read_to_end(call)] == ["completed"]

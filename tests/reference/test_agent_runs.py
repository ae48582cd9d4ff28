"""The reference Agent Execution (tool loop) and Workflow Engine: decisions as pure functions,
and runs over real gRPC whose notices a stand-in orchestrator records."""

from __future__ import annotations

import json
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.message import Message

from agent_execution.v1 import agent_execution_pb2
from conversation.v1 import conversation_pb2
from orchestrator.v1 import common_pb2, task_update_pb2
from reference import tools, workflows
from reference.agent_execution import ToolOutcome, ToolRequest, agent_answer, decide_tool_calls
from tests.reference.conftest import Stack, refused
from tools.v1 import tools_pb2
from workflow.v1 import workflow_pb2

PROGRESS = task_update_pb2.NOTICE_EVENT_PROGRESS
DELTA = task_update_pb2.NOTICE_EVENT_DELTA
COMPLETED = task_update_pb2.NOTICE_EVENT_COMPLETED
FAILED = task_update_pb2.NOTICE_EVENT_FAILED
TOOL_CALL = task_update_pb2.NOTICE_EVENT_TOOL_CALL
STEP = task_update_pb2.NOTICE_EVENT_STEP
STARTED = common_pb2.STEP_PHASE_STARTED
FINISHED = common_pb2.STEP_PHASE_FINISHED
PHASE_FAILED = common_pb2.STEP_PHASE_FAILED
BOTH = ("calculator", "clock")
M = TypeVar("M", bound=Message)


def calc(expression: str) -> ToolRequest:
    return ToolRequest("calculator", {"expression": expression})


CLOCK = ToolRequest("clock", {})


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("What is 2 + 3 * 4?", [calc("2 + 3 * 4")]),
        ("what time is it", [CLOCK]),
        (
            "Compute (1+2)/3, then tell me the date and 7 - 5.",
            [calc("(1+2)/3"), CLOCK, calc("7 - 5")],
        ),
        ("(what is 6*7)", [calc("6*7")]),
        ("I have 3 apples and 4 pears", []),
        ("my tool-bot is 2 years old", []),
        ("Is 1 / 0 fine? What's the TIME?", [calc("1 / 0"), CLOCK]),
        ("clock, clock, time", [CLOCK]),
        ("sum: 1+1.", [calc("1+1")]),
    ],
)
def test_the_agent_decides_tool_calls_from_the_message(
    message: str, expected: list[ToolRequest]
) -> None:
    assert decide_tool_calls(message, BOTH) == expected


def test_the_agent_uses_only_the_tools_it_has() -> None:
    message = "what is 1 + 1 and what time is it"
    assert decide_tool_calls(message, ["calculator"]) == [calc("1 + 1")]
    assert decide_tool_calls(message, ["clock", "weather"]) == [CLOCK]
    assert decide_tool_calls(message, []) == []


def test_the_answer_lists_results_errors_and_skipped_calls() -> None:
    outcomes = [
        ToolOutcome(calc("1+1"), result="2"),
        ToolOutcome(calc("1/0"), error="division by zero"),
    ]
    assert agent_answer("q", outcomes, 1, 2) == (
        "Reference agent answer to: q (after 2 earlier turn(s)). Tool results: "
        "calculator(1+1) = 2; calculator(1/0) = error: division by zero. "
        "1 more tool call(s) not made: the limit is 2"
    )
    assert agent_answer("q", [], 0, 0) == "Reference agent answer to: q"


def tool_definitions(*names: str) -> list[tools_pb2.ToolDefinition]:
    return [
        tools_pb2.ToolDefinition(
            name=spec.name,
            description=spec.description,
            parameters_json_schema=spec.parameters_json_schema,
        )
        for spec in (tools.TOOLS[name] for name in names)
    ]


def changed(request: M, changes: dict[str, Any]) -> M:
    """``request`` with some fields set (lists replace repeated fields)."""
    for name, value in changes.items():
        if isinstance(value, list):
            request.ClearField(name)
            getattr(request, name).extend(value)
        else:
            setattr(request, name, value)
    return request


def run(job_id: str, message: str, /, **extra: Any) -> agent_execution_pb2.StartRunRequest:
    request = agent_execution_pb2.StartRunRequest(
        tenant_id="demo",
        session_id="s1",
        agent_id="tool-bot",
        job_id=job_id,
        input=message,
        system_prompt="Use tools.",
        tools=tool_definitions(*BOTH),
        agent_version=3,
    )
    return changed(request, extra)


HISTORY = [
    conversation_pb2.Turn(role=conversation_pb2.ROLE_USER, content="tell me about apples"),
    conversation_pb2.Turn(
        role=conversation_pb2.ROLE_ASSISTANT, content="apples are fruit", tokens=7
    ),
    conversation_pb2.Turn(role=conversation_pb2.ROLE_USER, content="and pears"),
]


async def test_a_run_reports_its_tool_calls_then_the_answer(stack: Stack) -> None:
    message = "What is 2 + 3 * 4 and what time is it?"
    reply = await stack.agent_execution.StartRun(run("r1", message), timeout=5)
    assert reply.job_id == "r1"
    notices = await stack.orchestrator.recorder.wait_finished("r1")

    assert [n.event for n in notices] == [
        PROGRESS,
        TOOL_CALL,
        TOOL_CALL,
        TOOL_CALL,
        TOOL_CALL,
        DELTA,
        DELTA,
        DELTA,
        PROGRESS,
        COMPLETED,
    ]
    assert [n.sequence for n in notices] == list(range(1, 11))
    for notice in notices:
        assert notice.service == common_pb2.SERVICE_AGENT_EXECUTION
        assert (notice.job_id, notice.tenant_id, notice.agent_id) == ("r1", "demo", "tool-bot")
    calls = [
        (n.tool_call.call_id, n.tool_call.name, n.tool_call.phase, n.tool_call.result_summary)
        for n in notices
        if n.event == TOOL_CALL
    ]
    assert calls == [
        ("call-1", "calculator", STARTED, ""),
        ("call-1", "calculator", FINISHED, "14"),
        ("call-2", "clock", STARTED, ""),
        ("call-2", "clock", FINISHED, "2026-05-06T07:08:09Z"),
    ]
    assert json.loads(notices[1].tool_call.arguments_json) == {"expression": "2 + 3 * 4"}
    assert json.loads(notices[3].tool_call.arguments_json) == {}

    # The answer is the agent's draft completed by the LLM through the orchestrator's internal
    # API: its deltas reported as the run's, its tokens charged there (the run reports none).
    draft = (
        f"Reference agent answer to: {message}. Tool results: "
        "calculator(2 + 3 * 4) = 14; clock() = 2026-05-06T07:08:09Z"
    )
    ((call, metadata),) = stack.orchestrator.platform.calls
    assert (call.tenant_id, call.job_id, call.call_id) == ("demo", "r1", "answer")
    assert (call.prompt, call.model) == (draft, "reference-agent")
    assert metadata["authorization"].startswith("Bearer ")
    final = notices[-1]
    text = "".join(n.delta for n in notices if n.event == DELTA)
    assert text == final.result.text == f"Reference answer to: {draft}"
    assert final.result.model == "reference-agent"
    assert final.usage == common_pb2.TokenUsage()


async def test_runs_are_deterministic_and_use_history_and_model(stack: Stack) -> None:
    for job in ("d1", "d2"):
        await stack.agent_execution.StartRun(
            run(job, "1 + 1?", history=HISTORY, model="m-2"), timeout=5
        )
    first = await stack.orchestrator.recorder.wait_finished("d1")
    second = await stack.orchestrator.recorder.wait_finished("d2")
    assert [(n.event, n.delta, n.tool_call, n.result) for n in first] == [
        (n.event, n.delta, n.tool_call, n.result) for n in second
    ]
    final = first[-1]
    assert final.result.text.startswith(
        "Reference answer to: Reference agent answer to: 1 + 1? (after 3 earlier turn(s))"
    )
    assert final.result.model == "m-2"
    # Both runs asked with the same call id for their own job.
    assert [(c.job_id, c.call_id, c.model) for c, _ in stack.orchestrator.platform.calls] == [
        ("d1", "answer", "m-2"),
        ("d2", "answer", "m-2"),
    ]


async def test_max_tool_calls_bounds_the_loop(stack: Stack) -> None:
    message = "1+1, 2+2, 3+3 and the time"
    await stack.agent_execution.StartRun(run("m1", message, max_tool_calls=2), timeout=5)
    notices = await stack.orchestrator.recorder.wait_finished("m1")
    names = [
        n.tool_call.name for n in notices if n.event == TOOL_CALL and n.tool_call.phase == STARTED
    ]
    assert names == ["calculator", "calculator"]
    assert notices[-1].result.text.endswith("2 more tool call(s) not made: the limit is 2")


async def test_the_service_default_limit_applies_when_the_request_sets_none(stack: Stack) -> None:
    message = ", ".join(f"{n}+{n}" for n in range(12))
    await stack.agent_execution.StartRun(run("m2", message), timeout=5)
    notices = await stack.orchestrator.recorder.wait_finished("m2")
    started = [n for n in notices if n.event == TOOL_CALL and n.tool_call.phase == STARTED]
    assert len(started) == 8


async def test_a_failing_tool_call_is_reported_and_the_run_still_answers(stack: Stack) -> None:
    await stack.agent_execution.StartRun(run("z1", "what is 1 / 0"), timeout=5)
    notices = await stack.orchestrator.recorder.wait_finished("z1")
    failed = [n.tool_call for n in notices if n.event == TOOL_CALL][-1]
    assert failed.phase == PHASE_FAILED
    assert (failed.error.code, failed.error.message) == ("tool_error", "division by zero")
    assert failed.error.retryable is False
    assert notices[-1].event == COMPLETED
    assert notices[-1].result.text.endswith("calculator(1 / 0) = error: division by zero")


async def test_a_run_without_tools_answers_directly(stack: Stack) -> None:
    await stack.agent_execution.StartRun(run("n1", "what time is it", tools=[]), timeout=5)
    notices = await stack.orchestrator.recorder.wait_finished("n1")
    assert TOOL_CALL not in [n.event for n in notices]
    assert notices[-1].result.text == (
        "Reference answer to: Reference agent answer to: what time is it"
    )


async def test_a_repeated_start_is_the_same_run(stack: Stack) -> None:
    for _ in range(3):
        reply = await stack.agent_execution.StartRun(run("same", "2*3"), timeout=5)
        assert reply.job_id == "same"
    await stack.orchestrator.recorder.wait_finished("same")
    await stack.reference.reporter.wait_drained(5)
    raw = [n for n in stack.orchestrator.recorder.notices if n.job_id == "same"]
    assert len(raw) == len({n.sequence for n in raw})
    assert [m for m, *_ in stack.reference.seen] == ["StartRun"] * 3


@pytest.mark.parametrize("overrides", [{"step_delay_s": 30.0}])
async def test_cancel_run_only_for_its_tenant(stack: Stack) -> None:
    await stack.agent_execution.StartRun(run("slow", "1+1"), timeout=5)
    recorder = stack.orchestrator.recorder
    await recorder.wait_until(lambda: len(recorder.job("slow")) == 2)  # started, call-1 started
    foreign = agent_execution_pb2.CancelRunRequest(tenant_id="other", job_id="slow")
    assert (await stack.agent_execution.CancelRun(foreign, timeout=5)).cancelled is False
    mine = agent_execution_pb2.CancelRunRequest(tenant_id="demo", job_id="slow")
    assert (await stack.agent_execution.CancelRun(mine, timeout=5)).cancelled is True
    assert (await stack.agent_execution.CancelRun(mine, timeout=5)).cancelled is False


@pytest.mark.parametrize("overrides", [{"failure_rate": 1.0}])
async def test_failure_rate_fails_runs_and_workflows(stack: Stack) -> None:
    await stack.agent_execution.StartRun(run("f1", "1+1"), timeout=5)
    await stack.workflow.StartWorkflow(flow("f2", "q"), timeout=5)
    for job in ("f1", "f2"):
        notices = await stack.orchestrator.recorder.wait_finished(job)
        assert [n.event for n in notices] == [PROGRESS, FAILED]


# Bounds of the fields StartRun and StartWorkflow share.
START_BOUNDS: list[tuple[dict[str, Any], str]] = [
    ({"tenant_id": ""}, "tenant_id"),
    ({"tenant_id": "t" * 1025}, "tenant_id"),
    ({"session_id": "s" * 1025}, "session_id"),
    ({"agent_id": "a" * 1025}, "agent_id"),
    ({"job_id": "j" * 1025}, "job_id"),
    ({"request_id": "r" * 1025}, "request_id"),
    ({"model": "m" * 1025}, "model"),
    ({"input": ""}, "input"),
    ({"input": "i" * (256 * 1024 + 1)}, "input"),
    ({"history": [conversation_pb2.Turn(content="no role")]}, "history[0].role"),
    (
        {"history": [conversation_pb2.Turn(role=conversation_pb2.ROLE_USER, tokens=-1)]},
        "history[0].tokens",
    ),
    ({"history": HISTORY * 334}, "history"),
    ({"agent_version": -1}, "agent_version"),
]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        *START_BOUNDS,
        ({"system_prompt": "p" * (64 * 1024 + 1)}, "system_prompt"),
        ({"tools": tool_definitions("clock") * 65}, "tools"),
        ({"tools": [tools_pb2.ToolDefinition(name="")]}, "tools[0].name"),
        (
            {"tools": [tools_pb2.ToolDefinition(name="x", description="d" * 4097)]},
            "tools[0].description",
        ),
        (
            {"tools": [tools_pb2.ToolDefinition(name="x", parameters_json_schema="s" * 65537)]},
            "tools[0].parameters_json_schema",
        ),
        ({"max_tool_calls": -1}, "max_tool_calls"),
        ({"max_tool_calls": 65}, "max_tool_calls"),
    ],
)
async def test_start_run_bounds(stack: Stack, change: dict[str, Any], field: str) -> None:
    await refused(
        stack.agent_execution.StartRun(run("bad", "1+1", **change), timeout=5),
        grpc.StatusCode.INVALID_ARGUMENT,
        field,
    )
    assert stack.reference.seen == []


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [({"job_id": "x"}, "tenant_id"), ({"tenant_id": "demo"}, "job_id")],
)
async def test_cancel_bounds(stack: Stack, request_fields: dict[str, str], field: str) -> None:
    await refused(
        stack.agent_execution.CancelRun(
            agent_execution_pb2.CancelRunRequest(**request_fields), timeout=5
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        field,
    )
    await refused(
        stack.workflow.CancelWorkflow(
            workflow_pb2.CancelWorkflowRequest(**request_fields), timeout=5
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        field,
    )


# ---------------------------------------------------------------------------------------------
# Workflow Engine


def flow(job_id: str, message: str, /, **extra: Any) -> workflow_pb2.StartWorkflowRequest:
    request = workflow_pb2.StartWorkflowRequest(
        tenant_id="demo",
        session_id="s1",
        agent_id="research-flow",
        job_id=job_id,
        workflow_id="research-flow",
        input=message,
        agent_version=1,
    )
    return changed(request, extra)


def test_retrieve_prefers_turns_sharing_keywords() -> None:
    assert workflows.retrieve("Tell me more about APPLES", HISTORY) == [
        "tell me about apples",
        "apples are fruit",
    ]
    assert workflows.retrieve("bananas?", HISTORY) == [t.content for t in HISTORY]
    assert workflows.retrieve("anything", []) == []
    many = HISTORY * 3
    assert len(workflows.retrieve("bananas", many)) == workflows.MAX_PASSAGES


def test_summary_quotes_the_start_of_each_passage() -> None:
    long = " ".join(f"w{n}" for n in range(20))
    assert workflows.summarize([long, "short one", "   "]) == (
        " ".join(f"w{n}" for n in range(12)) + "; short one"
    )


async def test_research_flow_reports_each_step_and_answers_from_the_history(stack: Stack) -> None:
    reply = await stack.workflow.StartWorkflow(
        flow("w1", "more about apples", history=HISTORY), timeout=5
    )
    assert reply.job_id == "w1"
    notices = await stack.orchestrator.recorder.wait_finished("w1")
    assert [n.event for n in notices] == [
        PROGRESS,
        STEP,
        STEP,
        STEP,
        STEP,
        STEP,
        DELTA,
        DELTA,
        DELTA,
        STEP,
        PROGRESS,
        COMPLETED,
    ]
    for notice in notices:
        assert notice.service == common_pb2.SERVICE_WORKFLOW_ENGINE
        assert (notice.job_id, notice.tenant_id, notice.agent_id) == ("w1", "demo", "research-flow")
    steps = [
        (n.step.index, n.step.step_id, n.step.name, n.step.phase, n.step.summary)
        for n in notices
        if n.event == STEP
    ]
    assert steps == [
        (0, "retrieve", "retrieve", STARTED, ""),
        (0, "retrieve", "retrieve", FINISHED, "retrieved 2 passage(s) from 3 earlier turn(s)"),
        (1, "summarize", "summarize", STARTED, ""),
        (1, "summarize", "summarize", FINISHED, "summarized into 7 word(s)"),
        (2, "answer", "answer", STARTED, ""),
        (2, "answer", "answer", FINISHED, "answered in 22 word(s)"),
    ]
    draft = (
        "Reference research answer to: more about apples "
        "(drawing on 3 earlier turn(s): tell me about apples; apples are fruit)"
    )
    ((call, _),) = stack.orchestrator.platform.calls
    assert (call.tenant_id, call.job_id, call.call_id, call.prompt) == (
        "demo",
        "w1",
        "answer",
        draft,
    )
    final = notices[-1]
    text = "".join(n.delta for n in notices if n.event == DELTA)
    assert text == final.result.text == f"Reference answer to: {draft}"
    assert final.result.model == "reference-llm"
    assert final.usage == common_pb2.TokenUsage()  # charged through the internal call


async def test_research_flow_without_history(stack: Stack) -> None:
    await stack.workflow.StartWorkflow(flow("w2", "why", model="m-3"), timeout=5)
    notices = await stack.orchestrator.recorder.wait_finished("w2")
    assert notices[-1].result.text == (
        "Reference answer to: Reference research answer to: why (no earlier turns to draw on)"
    )
    assert notices[-1].result.model == "m-3"


async def test_unknown_workflows_are_not_found(stack: Stack) -> None:
    await refused(
        stack.workflow.StartWorkflow(flow("w3", "q", workflow_id="nope"), timeout=5),
        grpc.StatusCode.NOT_FOUND,
        "workflow_id",
    )


@pytest.mark.parametrize("overrides", [{"step_delay_s": 30.0}])
async def test_cancel_workflow_only_for_its_tenant(stack: Stack) -> None:
    await stack.workflow.StartWorkflow(flow("slow", "q"), timeout=5)
    recorder = stack.orchestrator.recorder
    await recorder.wait_until(lambda: len(recorder.job("slow")) == 2)
    foreign = workflow_pb2.CancelWorkflowRequest(tenant_id="other", job_id="slow")
    assert (await stack.workflow.CancelWorkflow(foreign, timeout=5)).cancelled is False
    mine = workflow_pb2.CancelWorkflowRequest(tenant_id="demo", job_id="slow")
    assert (await stack.workflow.CancelWorkflow(mine, timeout=5)).cancelled is True


@pytest.mark.parametrize(
    ("change", "field"),
    [
        *START_BOUNDS,
        ({"workflow_id": ""}, "workflow_id"),
        ({"workflow_id": "w" * 1025}, "workflow_id"),
    ],
)
async def test_start_workflow_bounds(stack: Stack, change: dict[str, Any], field: str) -> None:
    await refused(
        stack.workflow.StartWorkflow(flow("bad", "q", **change), timeout=5),
        grpc.StatusCode.INVALID_ARGUMENT,
        field,
    )
    assert stack.reference.seen == []


async def test_a_run_passes_its_request_id_and_trace_to_its_internal_call(stack: Stack) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    metadata = (("x-request-id", "req-77"), ("traceparent", traceparent))
    await stack.agent_execution.StartRun(run("t1", "1+1"), metadata=metadata, timeout=5)
    await stack.orchestrator.recorder.wait_finished("t1")
    ((_, sent),) = stack.orchestrator.platform.calls
    assert (sent["x-request-id"], sent["traceparent"]) == ("req-77", traceparent)


async def test_a_refused_internal_call_fails_the_run_and_the_workflow(stack: Stack) -> None:
    stack.orchestrator.platform.fail_with = grpc.StatusCode.FAILED_PRECONDITION
    await stack.agent_execution.StartRun(run("f1", "1+1"), timeout=5)
    await stack.workflow.StartWorkflow(flow("f2", "why"), timeout=5)
    for job_id in ("f1", "f2"):
        final = (await stack.orchestrator.recorder.wait_finished(job_id))[-1]
        assert final.event == FAILED
        assert final.error.code == "llm_call_failed" and not final.error.retryable
        assert "FAILED_PRECONDITION" in final.error.message

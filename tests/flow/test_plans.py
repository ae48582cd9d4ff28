"""Chat messages as orchestration plans (ORCH_PLANS), over real gRPC on both backends, with
in-memory platform services (tests.support.platform) and a recording dispatcher for the work:
each agent kind's plan, plan_step events on the client's stream, the history appended once per
job and read back by the next message, a service that is down retried within the job's deadline
or failing the job naming the step and the service, GetTask's plan, and a finalize resumed by
another server when the first one stops mid-append."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from domain.conversation import TurnRole
from domain.dispatch import DownstreamError
from domain.models import Service
from orchestrator.admin.v1 import admin_pb2
from orchestrator.v1 import batch_pb2, common_pb2, session_pb2
from tests.support.admin_calls import get_task
from tests.support.batches import NoticeDriver, llm_item, read_results, stream, submit
from tests.support.downstream import RecordingDispatcher
from tests.support.flow import TIMEOUT_S, Event, Flow, completed, kind_of, read_events
from tests.support.platform import FakePlatform
from tests.support.servers import running_server, tenant, test_settings

TENANT = "acme"
_SERVICE_PB = {
    Service.QUERY: common_pb2.SERVICE_QUERY,
    Service.AGENT_EXECUTION: common_pb2.SERVICE_AGENT_EXECUTION,
    Service.WORKFLOW_ENGINE: common_pb2.SERVICE_WORKFLOW_ENGINE,
}


@dataclasses.dataclass
class PlanFlow:
    flow: Flow
    platform: FakePlatform

    async def session(self, agent_id: str, tenant_id: str = TENANT) -> str:
        reply = await self.flow.sessions.CreateSession(
            session_pb2.CreateSessionRequest(agent_id=agent_id), metadata=tenant(tenant_id)
        )
        return str(reply.session.session_id)


def plan_settings(backend_url: str | None, **overrides: Any) -> Any:
    return test_settings(backend_url, plans=True, **overrides)


@pytest.fixture
async def plans(backend_url: str | None) -> AsyncIterator[PlanFlow]:
    platform = FakePlatform(TENANT, "globex")
    dispatcher = RecordingDispatcher()
    settings = plan_settings(backend_url)
    async with running_server(settings, dispatcher=dispatcher, platform=platform) as running:
        yield PlanFlow(Flow(running, dispatcher), platform)


def steps(events: list[Event]) -> list[tuple[str, str]]:
    """(name, state) of each plan_step event."""
    return [
        (e.plan_step.name, common_pb2.PlanStepState.Name(e.plan_step.state).split("_")[-1].lower())
        for e in events
        if kind_of(e) == "plan_step"
    ]


async def run_chat(
    plans: PlanFlow, session_id: str, content: str, service: Service, answer: str
) -> tuple[list[Event], Any]:
    """Send ``content``, answer the work as ``service`` and read the stream to its end;
    returns the events and the work handed over."""
    call = plans.flow.send(session_id, content)
    work = await plans.flow.dispatcher.next_submit()
    reply = await plans.flow.publish(
        [completed(work.job_id, 1, answer, service_pb=_SERVICE_PB[service])]
    )
    assert reply.accepted == 1
    events: list[Event] = []
    while not events or kind_of(events[-1]) not in ("completed", "failed"):
        events.extend(await read_events(call, 1))
    return events, work


async def test_an_llm_message_loads_history_queries_and_appends_its_turns(
    plans: PlanFlow,
) -> None:
    session_id = await plans.session("support-bot")
    events, work = await run_chat(
        plans, session_id, "Where is my order?", Service.QUERY, "Shipped."
    )

    assert work.service is Service.QUERY
    assert work.system_prompt == "You are a support assistant."
    assert work.model == "m-small" and work.agent_version == 3 and work.history == ()
    # One event per pre-step that finished (load_agent, done before the job started, with the
    # first hand-over's); the accepted and completed events tell the rest.
    assert [kind_of(e) for e in events] == ["accepted", "plan_step", "plan_step", "completed"]
    assert steps(events) == [("load_agent", "done"), ("load_history", "done")]
    assert events[-1].completed.result.text == "Shipped."
    stored = plans.platform.conversation.turns[(TENANT, session_id)]
    assert [(t.role, t.content, t.job_id) for t in stored] == [
        (TurnRole.USER, "Where is my order?", work.job_id),
        (TurnRole.ASSISTANT, "Shipped.", work.job_id),
    ]

    # The next message carries the history, within the agent's window of 4 turns.
    for n in range(2):
        _, later = await run_chat(plans, session_id, f"And now {n}?", Service.QUERY, f"n{n}")
    assert [t.content for t in later.history] == [
        "Where is my order?",
        "Shipped.",
        "And now 0?",
        "n0",
    ]


async def test_a_tool_agent_message_resolves_its_tools_and_runs_on_agent_execution(
    plans: PlanFlow,
) -> None:
    session_id = await plans.session("tool-bot")
    events, work = await run_chat(plans, session_id, "What is 2+3?", Service.AGENT_EXECUTION, "5")
    assert work.service is Service.AGENT_EXECUTION
    assert [t.name for t in work.tools] == ["calculator", "clock"]
    assert work.max_tool_calls == 5 and work.model == "m-tools"
    assert [kind_of(e) for e in events] == ["accepted", *["plan_step"] * 3, "completed"]
    assert steps(events)[0] == ("load_agent", "done")
    assert sorted(steps(events)[1:]) == [("load_history", "done"), ("resolve_tools", "done")]
    assert len(plans.platform.conversation.turns[(TENANT, session_id)]) == 2


async def test_a_workflow_agent_message_runs_its_workflow(plans: PlanFlow) -> None:
    session_id = await plans.session("research-flow")
    events, work = await run_chat(plans, session_id, "Summarize X", Service.WORKFLOW_ENGINE, "X")
    assert work.service is Service.WORKFLOW_ENGINE
    assert work.workflow_id == "retrieve-summarize-answer" and work.agent_version == 2
    assert [kind_of(e) for e in events] == ["accepted", "plan_step", "plan_step", "completed"]
    assert steps(events) == [("load_agent", "done"), ("load_history", "done")]


async def test_get_task_returns_the_plan_with_every_call(plans: PlanFlow) -> None:
    session_id = await plans.session("tool-bot")
    _, work = await run_chat(plans, session_id, "2*4?", Service.AGENT_EXECUTION, "8")
    task = await get_task(plans.flow.channel, TENANT, work.job_id)
    assert task.state == admin_pb2.TASK_STATE_COMPLETED
    assert task.agent_kind == "tool_agent" and task.agent_version == 1
    assert [(s.index, s.name, s.method) for s in task.plan] == [
        (0, "load_agent", "GetAgent"),
        (1, "load_history", "ListHistory"),
        (2, "resolve_tools", "ResolveTools"),
        (3, "run", "StartRun"),
        (4, "append_history", "AppendTurns"),
    ]
    assert {s.state for s in task.plan} == {common_pb2.PLAN_STEP_STATE_DONE}
    assert [s.service for s in task.plan] == [
        common_pb2.SERVICE_AGENT_MANAGEMENT,
        common_pb2.SERVICE_CONVERSATION,
        common_pb2.SERVICE_TOOL_REGISTRY,
        common_pb2.SERVICE_AGENT_EXECUTION,
        common_pb2.SERVICE_CONVERSATION,
    ]
    assert all(s.attempts == 1 and s.HasField("started") and s.HasField("ended") for s in task.plan)


async def test_a_service_down_for_a_while_is_retried_and_the_job_succeeds(
    plans: PlanFlow,
) -> None:
    session_id = await plans.session("support-bot")
    plans.platform.conversation.outage.fail_next(3)
    events, work = await run_chat(plans, session_id, "hi", Service.QUERY, "hello")
    assert kind_of(events[-1]) == "completed"
    task = await get_task(plans.flow.channel, TENANT, work.job_id)
    assert [s.attempts for s in task.plan if s.name == "load_history"] == [4]


async def test_an_append_retried_shows_its_attempts_and_no_event(plans: PlanFlow) -> None:
    session_id = await plans.session("support-bot")
    plans.platform.conversation.append_outage.fail_next(2)
    events, work = await run_chat(plans, session_id, "hi", Service.QUERY, "hello")
    assert [kind_of(e) for e in events] == ["accepted", "plan_step", "plan_step", "completed"]
    task = await get_task(plans.flow.channel, TENANT, work.job_id)
    [append] = [s for s in task.plan if s.name == "append_history"]
    assert (append.state, append.attempts) == (common_pb2.PLAN_STEP_STATE_DONE, 3)
    assert len(plans.platform.conversation.turns[(TENANT, session_id)]) == 2


@pytest.mark.parametrize(
    ("agent_id", "down", "step"),
    [
        ("support-bot", "conversation", "load_history (conversation)"),
        ("tool-bot", "tools", "resolve_tools (tool_registry)"),
    ],
)
async def test_a_service_that_stays_down_fails_the_job_naming_step_and_service(
    backend_url: str | None, agent_id: str, down: str, step: str
) -> None:
    platform = FakePlatform(TENANT)
    getattr(platform, down).outage.down = True
    dispatcher = RecordingDispatcher()
    settings = plan_settings(backend_url, job_deadline=1.5)
    async with running_server(settings, dispatcher=dispatcher, platform=platform) as running:
        plans = PlanFlow(Flow(running, dispatcher), platform)
        session_id = await plans.session(agent_id)
        call = plans.flow.send(session_id, "hi")
        events: list[Event] = []
        while not events or kind_of(events[-1]) not in ("completed", "failed", "timed_out"):
            events.extend(await read_events(call, 1))
        error = events[-1].failed.error
        assert (error.code, error.retryable) == ("step_failed", True)
        assert error.message.startswith(f"{step}: ")
        assert dispatcher.submitted == []  # the work never went out
        assert getattr(platform, down).outage.calls > 2  # retried before giving up


async def test_an_append_that_fails_fails_the_job_naming_append_history(
    backend_url: str | None,
) -> None:
    platform = FakePlatform(TENANT)
    platform.conversation.append_outage.down = True
    dispatcher = RecordingDispatcher()
    settings = plan_settings(backend_url, job_deadline=1.5)
    async with running_server(settings, dispatcher=dispatcher, platform=platform) as running:
        plans = PlanFlow(Flow(running, dispatcher), platform)
        session_id = await plans.session("support-bot")
        events, work = await run_chat(plans, session_id, "hi", Service.QUERY, "hello")
        # The failed call gets its event (a successful finalize has none).
        assert steps(events) == [
            ("load_agent", "done"),
            ("load_history", "done"),
            ("append_history", "failed"),
        ]
        error = events[-1].failed.error
        assert error.code == "step_failed"
        assert error.message.startswith("append_history (conversation): ")
        task = await get_task(running.channel, TENANT, work.job_id)
        assert task.state == admin_pb2.TASK_STATE_FAILED
        assert [s.state for s in task.plan if s.name == "append_history"] == [
            common_pb2.PLAN_STEP_STATE_FAILED
        ]


async def test_a_missing_agent_or_agent_management_down_refuses_the_message(
    plans: PlanFlow,
) -> None:
    session_id = await plans.session("support-bot")
    del plans.platform.agents.agents[(TENANT, "support-bot")]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await read_events(plans.flow.send(session_id, "hi"), 1)
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "support-bot" in str(refused.value.details())

    other = await plans.session("tool-bot")
    plans.platform.agents.outage.down = True
    with pytest.raises(grpc.aio.AioRpcError) as unavailable:
        await read_events(plans.flow.send(other, "hi"), 1)
    assert unavailable.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "agent_management" in str(unavailable.value.details())


async def test_a_queued_message_runs_its_plan_too(plans: PlanFlow) -> None:
    session_id = await plans.session("support-bot")
    first = plans.flow.send(session_id, "first")
    work = await plans.flow.dispatcher.next_submit()
    second = plans.flow.send(session_id, "second")  # queued behind the first
    [accepted] = await read_events(second, 1)
    assert accepted.accepted.queued
    await plans.flow.publish([completed(work.job_id, 1, "one")])
    queued = await plans.flow.dispatcher.next_submit()
    assert queued.system_prompt == "You are a support assistant."
    assert [t.content for t in queued.history] == ["first", "one"]
    await plans.flow.publish([completed(queued.job_id, 1, "two")])
    for call in (first, second):
        events: list[Event] = []
        while not events or kind_of(events[-1]) != "completed":
            events.extend(await read_events(call, 1))
    assert len(plans.platform.conversation.turns[(TENANT, session_id)]) == 4


async def test_a_finalize_interrupted_by_a_stopping_server_is_resumed_by_another_once(
    redis_url: str,
) -> None:
    platform = FakePlatform(TENANT)
    settings = plan_settings(redis_url, handoff_grace=0.3, shutdown_grace=0.2)
    dispatcher = RecordingDispatcher()
    async with running_server(settings, dispatcher=dispatcher, platform=platform) as first:
        plans = PlanFlow(Flow(first, dispatcher), platform)
        session_id = await plans.session("support-bot")
        call = plans.flow.send(session_id, "hello?")
        work = await dispatcher.next_submit()
        # The turns are stored, the answer is held: the first server never learns it.
        release = platform.conversation.answer_outage.hold_calls()
        await plans.flow.publish([completed(work.job_id, 1, "hi there")])
        await asyncio.wait_for(platform.conversation.answer_outage.held.wait(), TIMEOUT_S)
        # FINISHING: GetTask shows the work done and the append running (nothing recorded).
        task = await get_task(first.channel, TENANT, work.job_id)
        assert [(s.name, s.state) for s in task.plan][-2:] == [
            ("run", common_pb2.PLAN_STEP_STATE_DONE),
            ("append_history", common_pb2.PLAN_STEP_STATE_RUNNING),
        ]
        call.cancel()
    # The first server stopped mid-append (its finalize cancelled, its lease left to run out).
    release.set()
    assert platform.conversation.append_calls == [work.job_id]
    async with running_server(
        settings, dispatcher=RecordingDispatcher(), platform=platform
    ) as second:
        flow = Flow(second, RecordingDispatcher())
        follower = flow.follow(session_id)
        events: list[Event] = []
        while not events or kind_of(events[-1]) != "completed":
            events.extend(await read_events(follower, 1))
        follower.cancel()
    assert events[-1].job_id == work.job_id and events[-1].completed.result.text == "hi there"
    # Asked twice (the second server resumed at the append), stored once.
    assert platform.conversation.append_calls == [work.job_id, work.job_id]
    stored = platform.conversation.turns[(TENANT, session_id)]
    assert [t.content for t in stored] == ["hello?", "hi there"]


async def test_batch_items_run_planless_on_the_batch_session_and_planned_on_an_agents(
    backend_url: str | None,
) -> None:
    platform = FakePlatform(TENANT)
    dispatcher = RecordingDispatcher()
    settings = plan_settings(backend_url, batch_worker_enabled=True, batch_worker_poll=0.05)
    async with running_server(settings, dispatcher=dispatcher, platform=platform) as running:
        plans = PlanFlow(Flow(running, dispatcher), platform)
        session_id = await plans.session("support-bot")
        items = [
            llm_item("plain", "no agent here"),
            batch_pb2.BatchItem(
                custom_id="chat",
                kind=batch_pb2.BATCH_ITEM_KIND_CHAT_MESSAGE,
                content="to the support bot",
                session_id=session_id,
            ),
        ]
        async with NoticeDriver(plans.flow).running():
            batch = await submit(plans.flow, items)
            results = await read_results(stream(plans.flow, batch.batch_id))
        assert {r.custom_id: r.state for r in results} == {
            "plain": batch_pb2.BATCH_ITEM_STATE_COMPLETED,
            "chat": batch_pb2.BATCH_ITEM_STATE_COMPLETED,
        }
        by_content = {work.content: work for work, _ in dispatcher.submitted}
        assert by_content["no agent here"].system_prompt == ""
        assert by_content["to the support bot"].system_prompt == "You are a support assistant."
        stored = platform.conversation.turns[(TENANT, session_id)]
        assert [t.content for t in stored] == ["to the support bot", "re: to the support bot"]


async def test_the_work_service_down_fails_the_job_naming_the_run_step(
    backend_url: str | None,
) -> None:
    platform = FakePlatform(TENANT)
    down = DownstreamError("downstream_unavailable", "query service unavailable", retryable=True)
    dispatcher = RecordingDispatcher(fail_with=down)
    settings = plan_settings(backend_url, job_deadline=1.0)
    async with running_server(settings, dispatcher=dispatcher, platform=platform) as running:
        plans = PlanFlow(Flow(running, dispatcher), platform)
        session_id = await plans.session("support-bot")
        call = plans.flow.send(session_id, "hi")
        events: list[Event] = []
        while not events or kind_of(events[-1]) not in ("completed", "failed", "timed_out"):
            events.extend(await read_events(call, 1))
        error = events[-1].failed.error
        assert error.code == "step_failed"
        assert error.message == "run (query): query service unavailable"
        assert steps(events) == [
            ("load_agent", "done"),
            ("load_history", "done"),
            ("run", "failed"),
        ]
        failed_run = [e.plan_step for e in events if kind_of(e) == "plan_step"][-1]
        assert failed_run.attempts > 1 and failed_run.error.code == "downstream_unavailable"

"""Issue 13 end to end: real `orchestrator serve` processes with the embedded reference services
(as `make run` starts them), on both backends. A message to each demo agent runs as a plan
(Agent Management, Conversation, Tool Registry, then Query, Agent Execution or Workflow Engine,
then the turns appended), the stream shows every call, ListHistory lists the turns and GetTask
the plan; another tenant sees none of it. Two replicas on one Redis with the reference in
this process: an agent changed there is used by the next message on each replica."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator.admin.v1 import admin_pb2, admin_pb2_grpc
from orchestrator.v1 import chat_pb2, chat_pb2_grpc, common_pb2, session_pb2, session_pb2_grpc
from reference.app import ReferenceServices
from reference.config import ReferenceConfig
from tests.support.admin_calls import create_api_key
from tests.support.flow import kind_of, read_to_end
from tests.support.processes import ServerProcess, make_run_server
from tests.support.redis_process import RedisProcess, free_port
from tests.support.servers import bearer

TIMEOUT_S = 20.0
BOOTSTRAP_ADMIN_KEY = "ao_bootstrapagentse2e_" + "a" * 43
Metadata = tuple[tuple[str, str], ...]
Event = Any


@dataclass
class Served:
    """Replicas of one deployment and the keys a test calls them with."""

    servers: list[ServerProcess]
    keys: dict[str, Metadata]  # "demo", "other" (clients), "admin"

    @property
    def address(self) -> str:
        return self.servers[0].address


async def create_key(address: str, tenant_id: str, role: int) -> Metadata:
    return (bearer(await create_api_key(address, BOOTSTRAP_ADMIN_KEY, tenant_id, role)),)


async def client_keys(address: str) -> dict[str, Metadata]:
    return {
        "demo": await create_key(address, "demo", admin_pb2.API_KEY_ROLE_CLIENT),
        "other": await create_key(address, "other", admin_pb2.API_KEY_ROLE_CLIENT),
        "admin": (bearer(BOOTSTRAP_ADMIN_KEY),),
    }


@pytest.fixture(scope="module")
def module_redis() -> Iterator[RedisProcess]:
    redis = RedisProcess()
    redis.start()
    yield redis
    redis.close()


@pytest.fixture(scope="module", params=["memory", "redis"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """`orchestrator serve` with the embedded reference, plans and the agent check on (as
    `make run`), once per backend. On Redis the embedded services report with a service key
    the server creates for them (the demo keys exist on the memory backend only)."""
    env = {"REDIS_URL": request.getfixturevalue("module_redis").url}
    if request.param == "memory":
        env = {}
    server = make_run_server(
        tmp_path_factory.mktemp(f"agents-{request.param}") / "server.log",
        ORCH_BOOTSTRAP_ADMIN_KEY=BOOTSTRAP_ADMIN_KEY,
        REF_STEP_DELAY="0",
        **env,
    )
    server.start()
    try:
        yield Served([server], asyncio.run(client_keys(server.address)))
    finally:
        server.kill()


@pytest.fixture
async def channel(served: Served) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(served.address) as opened:
        yield opened


async def new_session(channel: grpc.aio.Channel, agent_id: str, key: Metadata) -> str:
    reply = await session_pb2_grpc.SessionServiceStub(channel).CreateSession(
        session_pb2.CreateSessionRequest(agent_id=agent_id), metadata=key, timeout=TIMEOUT_S
    )
    return str(reply.session.session_id)


async def chat(
    channel: grpc.aio.Channel, session_id: str, content: str, key: Metadata
) -> list[Event]:
    call = chat_pb2_grpc.ChatServiceStub(channel).SendMessage(
        chat_pb2.SendMessageRequest(session_id=session_id, content=content),
        metadata=key,
        timeout=TIMEOUT_S,
    )
    return await read_to_end(call)


async def history(channel: grpc.aio.Channel, session_id: str, key: Metadata) -> list[Any]:
    reply = await session_pb2_grpc.SessionServiceStub(channel).ListHistory(
        session_pb2.ListHistoryRequest(session_id=session_id), metadata=key, timeout=TIMEOUT_S
    )
    return list(reply.turns)


async def get_task(
    channel: grpc.aio.Channel, tenant_id: str, job_id: str, key: Metadata
) -> admin_pb2.Task:
    reply = await admin_pb2_grpc.AdminServiceStub(channel).GetTask(
        admin_pb2.GetTaskRequest(tenant_id=tenant_id, job_id=job_id),
        metadata=key,
        timeout=TIMEOUT_S,
    )
    task: admin_pb2.Task = reply.task
    return task


def _phase(value: int) -> str:
    return common_pb2.StepPhase.Name(value).removeprefix("STEP_PHASE_").lower()  # type: ignore[arg-type]


def labels(events: list[Event]) -> list[str]:
    """Each event as a label (plan steps, tool calls and workflow steps with their name and
    state), progress left out and a run of deltas as one "delta"."""
    found: list[str] = []
    for event in events:
        kind = kind_of(event)
        if kind == "plan_step":
            state = common_pb2.PlanStepState.Name(event.plan_step.state)
            label = f"plan {event.plan_step.name} {state.rsplit('_', 1)[-1].lower()}"
        elif kind == "tool_call":
            label = f"tool {event.tool_call.name} {_phase(event.tool_call.phase)}"
        elif kind == "workflow_step":
            label = f"step {event.workflow_step.name} {_phase(event.workflow_step.phase)}"
        elif kind == "progress" or (kind == "delta" and found and found[-1] == "delta"):
            continue
        else:
            label = kind
        found.append(label)
    return found


BEFORE = ["accepted", "plan load_agent done", "plan load_history done"]
# A finalize that succeeds appends no plan_step event: the completed event says it.
AFTER = ["completed"]
# What each demo agent's message shows on the stream, in order.
EXPECTED = {
    "support-bot": [*BEFORE, "delta", *AFTER],
    "tool-bot": [
        *BEFORE,
        "plan resolve_tools done",
        "tool calculator started",
        "tool calculator finished",
        "tool clock started",
        "tool clock finished",
        "delta",
        *AFTER,
    ],
    "research-flow": [
        *BEFORE,
        "step retrieve started",
        "step retrieve finished",
        "step summarize started",
        "step summarize finished",
        "step answer started",
        "delta",
        "step answer finished",
        *AFTER,
    ],
}
# Agent Execution and Workflow Engine make their LLM call through the internal API: it shows
# as an internal_call step right after the run.
PLANS = {
    "support-bot": ("llm", ["load_agent", "load_history", "run", "append_history"]),
    "tool-bot": (
        "tool_agent",
        ["load_agent", "load_history", "resolve_tools", "run", "internal_call", "append_history"],
    ),
    "research-flow": (
        "workflow",
        ["load_agent", "load_history", "run", "internal_call", "append_history"],
    ),
}
QUESTION = "what is 12*7 and what time is it"


@pytest.mark.parametrize("agent_id", sorted(EXPECTED))
async def test_each_agent_kind_runs_its_plan_end_to_end(
    served: Served, channel: grpc.aio.Channel, agent_id: str
) -> None:
    demo, admin = served.keys["demo"], served.keys["admin"]
    session_id = await new_session(channel, agent_id, demo)
    jobs = []
    for content in (QUESTION, "and (1+2)*3, at what time?"):
        events = await chat(channel, session_id, content, demo)
        assert labels(events) == EXPECTED[agent_id], labels(events)
        completed = events[-1].completed
        answer = "".join(e.delta.text for e in events if kind_of(e) == "delta")
        assert completed.result.text and completed.result.text == answer
        assert completed.usage.total_tokens > 0
        assert {e.job_id for e in events} == {events[0].job_id}
        jobs.append((events[0].job_id, content, completed.result.text))

        kind, names = PLANS[agent_id]
        task = await get_task(channel, "demo", events[0].job_id, admin)
        assert task.state == admin_pb2.TASK_STATE_COMPLETED
        assert (task.agent_id, task.agent_kind, task.agent_version) == (agent_id, kind, 1)
        assert [step.name for step in task.plan] == names
        assert {step.state for step in task.plan} == {common_pb2.PLAN_STEP_STATE_DONE}
        assert all(step.attempts == 1 and step.ended.seconds for step in task.plan)

    # Each job appended its user and assistant turns once, oldest first.
    turns = await history(channel, session_id, demo)
    assert [(t.job_id, t.role, t.content) for t in turns] == [
        turn
        for job_id, content, answer in jobs
        for turn in (
            (job_id, session_pb2.TURN_ROLE_USER, content),
            (job_id, session_pb2.TURN_ROLE_ASSISTANT, answer),
        )
    ]


async def test_tool_results_and_history_reach_the_answer(
    served: Served, channel: grpc.aio.Channel
) -> None:
    demo = served.keys["demo"]
    tools = await new_session(channel, "tool-bot", demo)
    events = await chat(channel, tools, QUESTION, demo)
    finished = [
        e.tool_call
        for e in events
        if kind_of(e) == "tool_call" and e.tool_call.phase == common_pb2.STEP_PHASE_FINISHED
    ]
    assert next((c.name, c.arguments_json, c.result_summary) for c in finished) == (
        "calculator",
        '{"expression": "12*7"}',
        "84",
    )
    assert "calculator(12*7) = 84" in events[-1].completed.result.text

    research = await new_session(channel, "research-flow", demo)
    await chat(channel, research, "agents plan their tool calls", demo)
    events = await chat(channel, research, "how do agents plan?", demo)
    assert "drawing on 2 earlier turn(s)" in events[-1].completed.result.text


async def test_another_tenant_sees_no_history_task_or_stream(
    served: Served, channel: grpc.aio.Channel
) -> None:
    demo, other, admin = served.keys["demo"], served.keys["other"], served.keys["admin"]
    session_id = await new_session(channel, "tool-bot", demo)
    events = await chat(channel, session_id, QUESTION, demo)
    job_id = events[0].job_id

    with pytest.raises(grpc.aio.AioRpcError) as listed:
        await history(channel, session_id, other)
    assert listed.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as got:
        await get_task(channel, "other", job_id, admin)
    assert got.value.code() == grpc.StatusCode.NOT_FOUND
    follow = chat_pb2_grpc.ChatServiceStub(channel).StreamSession(
        chat_pb2.StreamSessionRequest(session_id=session_id), metadata=other, timeout=TIMEOUT_S
    )
    with pytest.raises(grpc.aio.AioRpcError) as followed:
        await follow.read()
    assert followed.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as sent:
        await chat(channel, session_id, "mine now", other)
    assert sent.value.code() == grpc.StatusCode.NOT_FOUND
    # ... while the demo tenant still reads its own turns.
    assert len(await history(channel, session_id, demo)) == 2


async def tenant_usage(channel: grpc.aio.Channel, key: Metadata) -> tuple[int, dict[str, int]]:
    """The demo tenant's tokens today, in all and per agent."""
    reply = await admin_pb2_grpc.AdminServiceStub(channel).GetTenantUsage(
        admin_pb2.GetTenantUsageRequest(tenant_id="demo"), metadata=key, timeout=TIMEOUT_S
    )
    return reply.tokens_today, {a.agent_id: a.total_tokens for a in reply.agents}


@pytest.mark.parametrize("agent_id", ["tool-bot", "research-flow"])
async def test_an_agents_llm_call_goes_through_the_internal_api_and_usage_adds_up(
    served: Served, channel: grpc.aio.Channel, agent_id: str
) -> None:
    demo, admin = served.keys["demo"], served.keys["admin"]
    session_id = await new_session(channel, agent_id, demo)
    before, agents_before = await tenant_usage(channel, admin)
    events = await chat(channel, session_id, QUESTION, demo)
    usage = events[-1].completed.usage
    assert usage.total_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    # The job's usage is its internal call's: the service reported none of its own.
    task = await get_task(channel, "demo", events[0].job_id, admin)
    assert task.usage == usage
    call = task.plan[-2]
    assert call.index == len(task.plan) - 2
    assert (call.name, call.method, call.service) == (
        "internal_call",
        "Complete",
        common_pb2.SERVICE_QUERY,
    )
    assert call.state == common_pb2.PLAN_STEP_STATE_DONE
    # The same tokens once in the session, the tenant's day and the agent's share of it.
    reply = await session_pb2_grpc.SessionServiceStub(channel).GetSession(
        session_pb2.GetSessionRequest(session_id=session_id), metadata=demo, timeout=TIMEOUT_S
    )
    assert reply.session.token_usage == usage
    after, agents_after = await tenant_usage(channel, admin)
    assert after - before == usage.total_tokens
    assert agents_after[agent_id] - agents_before.get(agent_id, 0) == usage.total_tokens


async def test_an_unknown_agent_is_refused_at_create_session(
    served: Served, channel: grpc.aio.Channel
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await new_session(channel, "nobody-bot", served.keys["demo"])
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nobody-bot" in (refused.value.details() or "")


# -- two replicas on one Redis, the reference in this process -----------------------------------


@dataclass
class Replicas:
    served: Served
    reference: ReferenceServices


@pytest.fixture
async def replicas(redis_url: str, tmp_path: Path) -> AsyncIterator[Replicas]:
    """Two `orchestrator serve` replicas sharing the test's Redis, every platform service at
    the in-process reference (whose agents a test can change), which reports to both."""
    reference_port = free_port()
    reference_address = f"127.0.0.1:{reference_port}"
    servers = [
        ServerProcess(
            tmp_path / f"replica{i}.log",
            REDIS_URL=redis_url,
            ORCH_PLANS="true",
            ORCH_AGENT_CHECK="true",
            ORCH_BOOTSTRAP_ADMIN_KEY=BOOTSTRAP_ADMIN_KEY,
            ORCH_QUERY_SERVICE_ADDRESS=reference_address,
            ORCH_EMBEDDING_SERVICE_ADDRESS=reference_address,
        )
        for i in (1, 2)
    ]
    reference: ReferenceServices | None = None
    try:
        for server in servers:
            server.start()
        keys = await client_keys(servers[0].address)
        service_key = await create_key(
            servers[0].address, "platform", admin_pb2.API_KEY_ROLE_SERVICE
        )
        reference = ReferenceServices(
            ReferenceConfig(
                listen_address=reference_address,
                orchestrator_address=",".join(s.address for s in servers),
                step_delay_s=0.0,
                publish_metadata=service_key,
            )
        )
        await reference.start()
        yield Replicas(Served(servers, keys), reference)
    finally:
        if reference is not None:
            await reference.stop()
        for server in servers:
            server.kill()


async def agent_version_of_next_message(address: str, served: Served, agent_id: str) -> int:
    """Send a message on a new session of ``agent_id`` through ``address``; the agent version
    its job ran with (GetTask)."""
    demo, admin = served.keys["demo"], served.keys["admin"]
    async with grpc.aio.insecure_channel(address) as channel:
        session_id = await new_session(channel, agent_id, demo)
        events = await chat(channel, session_id, "what is 2+2", demo)
        assert kind_of(events[-1]) == "completed", events[-1]
        task = await get_task(channel, "demo", events[0].job_id, admin)
    return int(task.agent_version)


async def test_an_agent_changed_in_the_reference_is_used_by_every_replica(
    replicas: Replicas,
) -> None:
    served, reference = replicas.served, replicas.reference
    addresses = [server.address for server in served.servers]
    # Both replicas ran tool-bot version 1 (now in the shared cache).
    assert [await agent_version_of_next_message(a, served, "tool-bot") for a in addresses] == [
        1,
        1,
    ]

    reference.agents.update_agent("demo", "tool-bot", max_tool_calls=1)
    await reference.reporter.wait_drained(TIMEOUT_S)
    # The agent_changed notice went first on the reporter's one ordered stream: once a job
    # started after it has reported to the end, the orchestrator applied it.
    assert await agent_version_of_next_message(addresses[0], served, "support-bot") == 1

    versions = [await agent_version_of_next_message(a, served, "tool-bot") for a in addresses]
    assert versions == [2, 2]
    # ... and the run got the new limit: one tool call where the message asks for two.
    async with grpc.aio.insecure_channel(addresses[1]) as channel:
        session_id = await new_session(channel, "tool-bot", served.keys["demo"])
        events = await chat(channel, session_id, QUESTION, served.keys["demo"])
    started = [
        e
        for e in events
        if kind_of(e) == "tool_call" and e.tool_call.phase == common_pb2.STEP_PHASE_STARTED
    ]
    assert len(started) == 1

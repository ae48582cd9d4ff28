"""The orchestrator's typed clients (clients.platform, clients.downstream) against the real
reference services: the contracts agree on both sides."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from clients.downstream import DownstreamConfig, GrpcDispatcher
from clients.platform import PlatformClients
from clients.retry import RetryPolicy
from domain.agents import AgentKind, AgentLimits
from domain.conversation import HistoryWindow, Turn, TurnRole
from domain.dispatch import CallContext, DownstreamError, WorkRequest
from domain.models import Service, WorkKind
from orchestrator.v1 import task_update_pb2
from tests.reference.conftest import FIXED_NOW, Stack

DEMO = CallContext(tenant_id="demo", request_id="req-1", timeout_s=5.0)
OTHER = CallContext(tenant_id="other", request_id="req-2", timeout_s=5.0)


@pytest.fixture
def config(stack: Stack) -> DownstreamConfig:
    address = stack.reference.address
    return DownstreamConfig(address, address, RetryPolicy(max_attempts=1))


@pytest.fixture
async def platform(config: DownstreamConfig) -> AsyncIterator[PlatformClients]:
    clients = PlatformClients.connect(config)
    yield clients
    await clients.aclose()


@pytest.fixture
async def dispatcher(config: DownstreamConfig) -> AsyncIterator[GrpcDispatcher]:
    client = GrpcDispatcher(config)
    yield client
    await client.aclose()


async def test_agents_read_through_the_directory(platform: PlatformClients) -> None:
    tool_bot = await platform.agents.get_agent("tool-bot", DEMO)
    assert tool_bot is not None
    assert (tool_bot.tenant_id, tool_bot.kind, tool_bot.version) == (
        "demo",
        AgentKind.TOOL_AGENT,
        1,
    )
    assert tool_bot.tool_names == ("calculator", "clock")
    assert tool_bot.limits == AgentLimits(max_history_turns=20, max_tool_calls=4)
    flow = await platform.agents.get_agent("research-flow", OTHER)
    assert flow is not None and flow.workflow_id == "research-flow"
    assert await platform.agents.get_agent("nope", DEMO) is None
    acme = CallContext(tenant_id="acme", request_id="r", timeout_s=5.0)
    assert await platform.agents.get_agent("support-bot", acme) is None


async def test_an_update_is_what_the_directory_reads_next(
    stack: Stack, platform: PlatformClients
) -> None:
    stack.reference.agents.update_agent("demo", "support-bot", model="m-2")
    agent = await platform.agents.get_agent("support-bot", DEMO)
    assert agent is not None and (agent.version, agent.model) == (2, "m-2")


async def test_conversation_through_the_store(platform: PlatformClients) -> None:
    turns = [Turn(TurnRole.USER, "what is two plus two"), Turn(TurnRole.ASSISTANT, "four")]
    for _ in range(2):  # a retried append adds nothing
        await platform.conversation.append_turns("s1", "job-1", turns, DEMO)
    await platform.conversation.append_turns("s1", "job-2", turns, DEMO)

    page = await platform.conversation.list_history("s1", DEMO, page_size=3)
    assert [(t.role, t.content, t.job_id, t.tokens) for t in page.turns] == [
        (TurnRole.USER, "what is two plus two", "job-1", 5),
        (TurnRole.ASSISTANT, "four", "job-1", 1),
        (TurnRole.USER, "what is two plus two", "job-2", 5),
    ]
    assert page.turns[0].time_ms == int(FIXED_NOW.timestamp() * 1000)
    rest = await platform.conversation.list_history(
        "s1", DEMO, page_size=3, page_token=page.next_page_token
    )
    assert [t.content for t in rest.turns] == ["four"] and rest.next_page_token == ""

    window = await platform.conversation.list_history(
        "s1", DEMO, window=HistoryWindow(last_turns=3, token_budget=6)
    )
    assert [t.content for t in window.turns] == ["what is two plus two", "four"]
    assert (await platform.conversation.list_history("s1", OTHER)).turns == []


async def test_a_forged_page_token_is_rejected(platform: PlatformClients) -> None:
    with pytest.raises(DownstreamError) as caught:
        await platform.conversation.list_history("s1", DEMO, page_token="forged")
    assert caught.value.retryable is False
    assert "page_token" in caught.value.message


async def test_tools_through_the_catalog(platform: PlatformClients) -> None:
    resolved = await platform.tools.resolve(["clock", "calculator"], DEMO)
    assert [tool.name for tool in resolved] == ["clock", "calculator"]
    assert all(tool.parameters_json.startswith("{") for tool in resolved)
    with pytest.raises(DownstreamError) as caught:
        await platform.tools.resolve(["calculator", "shell"], DEMO)
    assert caught.value.code == "unknown_tool"
    assert "shell" in caught.value.message


def work(job_id: str, service: Service, content: str, **extra: object) -> WorkRequest:
    return WorkRequest(
        job_id=job_id,
        tenant_id="demo",
        session_id="s1",
        agent_id="agent",
        kind=WorkKind.LLM_QUERY,
        content=content,
        run_service=service,
        history=(Turn(TurnRole.USER, "earlier about numbers"),),
        agent_version=2,
        **extra,  # type: ignore[arg-type]
    )


async def test_runs_and_workflows_through_the_dispatcher(
    stack: Stack, platform: PlatformClients, dispatcher: GrpcDispatcher
) -> None:
    tools = tuple(await platform.tools.resolve(["calculator"], DEMO))
    run = work("run-1", Service.AGENT_EXECUTION, "what is 6 * 7", tools=tools, max_tool_calls=2)
    assert await dispatcher.submit(run, DEMO) == "run-1"
    flow = work("flow-1", Service.WORKFLOW_ENGINE, "numbers again", workflow_id="research-flow")
    assert await dispatcher.submit(flow, DEMO) == "flow-1"

    recorder = stack.orchestrator.recorder
    run_notices = await recorder.wait_finished("run-1")
    calls = [n.tool_call for n in run_notices if n.tool_call.name]
    assert [(c.name, c.result_summary) for c in calls] == [("calculator", ""), ("calculator", "42")]
    assert run_notices[-1].event == task_update_pb2.NOTICE_EVENT_COMPLETED
    assert run_notices[-1].result.text.endswith("calculator(6 * 7) = 42")

    flow_notices = await recorder.wait_finished("flow-1")
    assert [n.step.name for n in flow_notices if n.step.name][::2] == [
        "retrieve",
        "summarize",
        "answer",
    ]
    assert "earlier about numbers" in flow_notices[-1].result.text
    methods = [seen.method for seen in stack.reference.seen]
    assert methods == ["StartRun", "StartWorkflow"]


@pytest.mark.parametrize("overrides", [{"step_delay_s": 30.0}])
async def test_cancel_through_the_dispatcher(stack: Stack, dispatcher: GrpcDispatcher) -> None:
    flow = work("slow", Service.WORKFLOW_ENGINE, "q", workflow_id="research-flow")
    await dispatcher.submit(flow, DEMO)
    assert await dispatcher.cancel(Service.WORKFLOW_ENGINE, "slow", OTHER) is False
    assert await dispatcher.cancel(Service.WORKFLOW_ENGINE, "slow", DEMO) is True
    run = work("slow-run", Service.AGENT_EXECUTION, "1+1")
    await dispatcher.submit(run, DEMO)
    assert await dispatcher.cancel(Service.AGENT_EXECUTION, "slow-run", DEMO) is True

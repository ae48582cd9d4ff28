"""clients.platform (Agent Management, Conversation, Tool Registry) against real grpc.aio
servers on loopback with scripted servicers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from agents.v1 import agents_pb2, agents_pb2_grpc
from clients.downstream import DownstreamConfig
from clients.platform import PlatformClients
from conversation.v1 import conversation_pb2, conversation_pb2_grpc
from domain.agents import AgentConfig, AgentKind, AgentLimits, ToolDefinition
from domain.conversation import HistoryWindow, Turn, TurnRole
from domain.dispatch import CallContext, DownstreamError
from tests.clients.fakes import Script
from tests.support.redis_process import free_port
from tools.v1 import tools_pb2, tools_pb2_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
CTX = CallContext(tenant_id="acme", request_id="req-5", timeout_s=5.0, traceparent=TRACEPARENT)


def tool_bot(**changes: Any) -> agents_pb2.Agent:
    agent = agents_pb2.Agent(
        tenant_id="acme",
        agent_id="tool-bot",
        kind=agents_pb2.AGENT_KIND_TOOL_AGENT,
        model="m-1",
        system_prompt="use tools",
        tool_names=["calculator", "clock"],
        workflow_id="",
        limits=agents_pb2.AgentLimits(
            max_history_turns=8, max_history_tokens=500, max_tool_calls=3
        ),
        version=4,
    )
    for name, value in changes.items():
        if isinstance(value, agents_pb2.AgentLimits):
            agent.limits.CopyFrom(value)
        else:
            setattr(agent, name, value)
    return agent


class FakeAgents(agents_pb2_grpc.AgentManagementServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.agent: agents_pb2.Agent | None = tool_bot()

    async def GetAgent(
        self, request: agents_pb2.GetAgentRequest, context: Ctx
    ) -> agents_pb2.GetAgentResponse:
        await self.script.play("GetAgent", request, context)
        if self.agent is None:
            return agents_pb2.GetAgentResponse()
        return agents_pb2.GetAgentResponse(agent=self.agent)


@dataclass
class Conversation:
    """Answers ListHistory with ``turns`` and ``next_page_token``."""

    turns: list[conversation_pb2.Turn] = field(default_factory=list)
    next_page_token: str = ""


class FakeConversation(conversation_pb2_grpc.ConversationServiceServicer):
    def __init__(self, script: Script, state: Conversation) -> None:
        self.script = script
        self.state = state

    async def AppendTurns(
        self, request: conversation_pb2.AppendTurnsRequest, context: Ctx
    ) -> conversation_pb2.AppendTurnsResponse:
        await self.script.play("AppendTurns", request, context)
        return conversation_pb2.AppendTurnsResponse(appended=True)

    async def ListHistory(
        self, request: conversation_pb2.ListHistoryRequest, context: Ctx
    ) -> conversation_pb2.ListHistoryResponse:
        await self.script.play("ListHistory", request, context)
        return conversation_pb2.ListHistoryResponse(
            turns=self.state.turns, next_page_token=self.state.next_page_token
        )


CATALOGUE = {
    "calculator": tools_pb2.ToolDefinition(
        name="calculator", description="evaluates arithmetic", parameters_json_schema='{"a":1}'
    ),
    "clock": tools_pb2.ToolDefinition(name="clock", description="the time"),
}


class FakeTools(tools_pb2_grpc.ToolRegistryServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.reorder = False

    async def ResolveTools(
        self, request: tools_pb2.ResolveToolsRequest, context: Ctx
    ) -> tools_pb2.ResolveToolsResponse:
        await self.script.play("ResolveTools", request, context)
        for name in request.names:
            if name not in CATALOGUE:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown tool {name!r}")
        tools = [CATALOGUE[name] for name in request.names]
        return tools_pb2.ResolveToolsResponse(tools=tools[::-1] if self.reorder else tools)


@dataclass
class Fakes:
    agents: Script
    conversation: Script
    tools: Script
    agent_service: FakeAgents
    tool_service: FakeTools
    history: Conversation
    clients: PlatformClients
    addresses: list[str]


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    """Each service on a server of its own, so the configured addresses are observable."""
    agents, conversation, tools = Script(), Script(), Script()
    history = Conversation()
    agent_service, tool_service = FakeAgents(agents), FakeTools(tools)
    servers = [grpc.aio.server() for _ in range(3)]
    agents_pb2_grpc.add_AgentManagementServiceServicer_to_server(agent_service, servers[0])
    conversation_pb2_grpc.add_ConversationServiceServicer_to_server(
        FakeConversation(conversation, history), servers[1]
    )
    tools_pb2_grpc.add_ToolRegistryServiceServicer_to_server(tool_service, servers[2])
    addresses = [f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}" for server in servers]
    for server in servers:
        await server.start()
    unused = f"127.0.0.1:{free_port()}"
    clients = PlatformClients.connect(
        DownstreamConfig(
            query_address=unused,
            embedding_address=unused,
            attempt_timeout_s=2.0,
            backoff_base_s=0.01,
            backoff_cap_s=0.05,
            agent_management_address=addresses[0],
            conversation_address=addresses[1],
            tool_registry_address=addresses[2],
        )
    )
    yield Fakes(
        agents, conversation, tools, agent_service, tool_service, history, clients, addresses
    )
    await clients.aclose()
    for server in servers:
        await server.stop(None)


def assert_metadata(metadata: dict[str, str]) -> None:
    assert metadata["x-tenant-id"] == "acme"
    assert metadata["x-request-id"] == "req-5"
    assert metadata["traceparent"] == TRACEPARENT


# Agent Management


async def test_get_agent_maps_the_configuration(fakes: Fakes) -> None:
    agent = await fakes.clients.agents.get_agent("tool-bot", CTX)
    assert agent == AgentConfig(
        tenant_id="acme",
        agent_id="tool-bot",
        kind=AgentKind.TOOL_AGENT,
        version=4,
        model="m-1",
        system_prompt="use tools",
        tool_names=("calculator", "clock"),
        workflow_id="",
        limits=AgentLimits(max_history_turns=8, max_history_tokens=500, max_tool_calls=3),
    )
    [(method, request, metadata)] = fakes.agents.calls
    assert method == "GetAgent"
    assert isinstance(request, agents_pb2.GetAgentRequest)
    assert (request.tenant_id, request.agent_id) == ("acme", "tool-bot")
    assert_metadata(metadata)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (agents_pb2.AGENT_KIND_LLM, AgentKind.LLM),
        (agents_pb2.AGENT_KIND_WORKFLOW, AgentKind.WORKFLOW),
    ],
)
async def test_get_agent_maps_every_kind(
    fakes: Fakes, kind: agents_pb2.AgentKind.ValueType, expected: AgentKind
) -> None:
    fakes.agent_service.agent = tool_bot(kind=kind, workflow_id="research")
    agent = await fakes.clients.agents.get_agent("tool-bot", CTX)
    assert agent is not None
    assert (agent.kind, agent.workflow_id) == (expected, "research")


async def test_get_agent_not_found_is_none(fakes: Fakes) -> None:
    fakes.agents.abort = grpc.StatusCode.NOT_FOUND
    fakes.agents.abort_details = "no agent ghost"
    assert await fakes.clients.agents.get_agent("ghost", CTX) is None
    assert len(fakes.agents.calls) == 1


async def test_get_agent_retries_unavailable(fakes: Fakes) -> None:
    fakes.agents.unavailable = 2
    agent = await fakes.clients.agents.get_agent("tool-bot", CTX)
    assert agent is not None and agent.version == 4
    assert len(fakes.agents.calls) == 3


async def test_agent_management_down_is_unavailable_naming_it(fakes: Fakes) -> None:
    fakes.agents.unavailable = 10
    with pytest.raises(DownstreamError) as caught:
        await fakes.clients.agents.get_agent("tool-bot", CTX)
    assert caught.value.code == "downstream_unavailable"
    assert caught.value.retryable is True
    assert "agent_management service (GetAgent at" in caught.value.message
    assert fakes.addresses[0] in caught.value.message
    assert len(fakes.agents.calls) == 3


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.PERMISSION_DENIED, "downstream_rejected"),
        (grpc.StatusCode.INTERNAL, "downstream_error"),
    ],
)
async def test_get_agent_errors_map_like_query(
    fakes: Fakes, code: grpc.StatusCode, expected: str
) -> None:
    fakes.agents.abort = code
    with pytest.raises(DownstreamError) as caught:
        await fakes.clients.agents.get_agent("tool-bot", CTX)
    assert caught.value.code == expected
    assert caught.value.retryable is False
    assert len(fakes.agents.calls) == 1


@pytest.mark.parametrize(
    ("agent", "problem"),
    [
        (tool_bot(tenant_id="globex"), "got tenant 'globex'"),
        (tool_bot(agent_id="other"), "got agent 'other'"),
        (tool_bot(kind=agents_pb2.AGENT_KIND_UNSPECIFIED), "no known kind"),
        (tool_bot(version=-1), "negative version"),
        (
            tool_bot(limits=agents_pb2.AgentLimits(max_tool_calls=-2)),
            "negative limit",
        ),
        (None, "no agent in the reply"),
    ],
)
async def test_an_answer_against_the_contract_is_refused(
    fakes: Fakes, agent: agents_pb2.Agent | None, problem: str
) -> None:
    fakes.agent_service.agent = agent
    with pytest.raises(DownstreamError) as caught:
        await fakes.clients.agents.get_agent("tool-bot", CTX)
    assert caught.value.code == "downstream_bad_reply"
    assert caught.value.retryable is False
    assert problem in caught.value.message


async def test_get_agent_is_bounded_by_the_caller_deadline(fakes: Fakes) -> None:
    fakes.agents.delay_s = 5.0
    started = time.monotonic()
    with pytest.raises(DownstreamError) as caught:
        await fakes.clients.agents.get_agent("tool-bot", CallContext("acme", "r", timeout_s=0.3))
    assert caught.value.code == "downstream_timeout"
    assert time.monotonic() - started < 1.5


# Conversation


async def test_append_turns_sends_the_job_id_and_turns(fakes: Fakes) -> None:
    turns = [
        Turn(TurnRole.USER, "what is 2+3?", job_id="job-1", time_ms=1_700_000_000_500, tokens=4),
        Turn(TurnRole.ASSISTANT, "5", job_id="job-1", tokens=1),
    ]
    await fakes.clients.conversation.append_turns("s-1", "job-1", turns, CTX)
    [(method, request, metadata)] = fakes.conversation.calls
    assert method == "AppendTurns"
    assert isinstance(request, conversation_pb2.AppendTurnsRequest)
    assert (request.tenant_id, request.session_id, request.job_id, request.request_id) == (
        "acme",
        "s-1",
        "job-1",
        "req-5",
    )
    assert [(t.role, t.content, t.job_id, t.tokens) for t in request.turns] == [
        (conversation_pb2.ROLE_USER, "what is 2+3?", "job-1", 4),
        (conversation_pb2.ROLE_ASSISTANT, "5", "job-1", 1),
    ]
    assert request.turns[0].time.ToMilliseconds() == 1_700_000_000_500
    assert_metadata(metadata)


async def test_append_turns_retries_unavailable_with_the_same_job_id(fakes: Fakes) -> None:
    fakes.conversation.unavailable = 1
    await fakes.clients.conversation.append_turns("s-1", "job-1", [], CTX)
    assert [call[1].job_id for call in fakes.conversation.calls] == ["job-1", "job-1"]  # type: ignore[attr-defined]


async def test_conversation_down_is_unavailable_naming_it(fakes: Fakes) -> None:
    fakes.conversation.unavailable = 10
    with pytest.raises(DownstreamError) as caught:
        await fakes.clients.conversation.append_turns("s-1", "job-1", [], CTX)
    assert caught.value.code == "downstream_unavailable"
    assert "conversation service (AppendTurns at" in caught.value.message


async def test_list_history_sends_the_window_and_page_and_maps_turns(fakes: Fakes) -> None:
    stamp = conversation_pb2.Turn(role=conversation_pb2.ROLE_USER, content="hi", job_id="j-0")
    stamp.time.FromMilliseconds(1_700_000_000_001)
    fakes.history.turns = [
        stamp,
        conversation_pb2.Turn(
            role=conversation_pb2.ROLE_ASSISTANT, content="hello", job_id="j-0", tokens=2
        ),
    ]
    fakes.history.next_page_token = "p-2"
    page = await fakes.clients.conversation.list_history(
        "s-1",
        CTX,
        window=HistoryWindow(last_turns=6, token_budget=900),
        page_size=2,
        page_token="p-1",
    )
    assert page.turns == [
        Turn(TurnRole.USER, "hi", job_id="j-0", time_ms=1_700_000_000_001),
        Turn(TurnRole.ASSISTANT, "hello", job_id="j-0", tokens=2),
    ]
    assert page.next_page_token == "p-2"
    [(method, request, metadata)] = fakes.conversation.calls
    assert method == "ListHistory"
    assert isinstance(request, conversation_pb2.ListHistoryRequest)
    assert (request.tenant_id, request.session_id) == ("acme", "s-1")
    assert (request.last_turns, request.token_budget) == (6, 900)
    assert (request.page_size, request.page_token) == (2, "p-1")
    assert_metadata(metadata)


async def test_list_history_without_a_window_asks_for_everything(fakes: Fakes) -> None:
    page = await fakes.clients.conversation.list_history("s-1", CTX)
    assert page.turns == [] and page.next_page_token == ""
    request = fakes.conversation.calls[0][1]
    assert isinstance(request, conversation_pb2.ListHistoryRequest)
    assert (request.last_turns, request.token_budget, request.page_size) == (0, 0, 0)


async def test_a_turn_without_a_role_is_refused(fakes: Fakes) -> None:
    fakes.history.turns = [conversation_pb2.Turn(content="who said this?")]
    with pytest.raises(DownstreamError) as caught:
        await fakes.clients.conversation.list_history("s-1", CTX)
    assert caught.value.code == "downstream_bad_reply"
    assert "no role" in caught.value.message


async def test_list_history_not_found_is_a_rejection(fakes: Fakes) -> None:
    fakes.conversation.abort = grpc.StatusCode.NOT_FOUND
    with pytest.raises(DownstreamError) as caught:
        await fakes.clients.conversation.list_history("s-1", CTX)
    assert caught.value.code == "downstream_rejected"
    assert caught.value.retryable is False


# Tool Registry


async def test_resolve_returns_definitions_in_request_order(fakes: Fakes) -> None:
    tools = await fakes.clients.tools.resolve(["clock", "calculator"], CTX)
    assert tools == [
        ToolDefinition("clock", "the time", ""),
        ToolDefinition("calculator", "evaluates arithmetic", '{"a":1}'),
    ]
    [(method, request, metadata)] = fakes.tools.calls
    assert method == "ResolveTools"
    assert isinstance(request, tools_pb2.ResolveToolsRequest)
    assert (request.tenant_id, list(request.names)) == ("acme", ["clock", "calculator"])
    assert_metadata(metadata)


async def test_resolve_of_no_names_calls_nothing(fakes: Fakes) -> None:
    assert await fakes.clients.tools.resolve([], CTX) == []
    assert fakes.tools.calls == []


async def test_an_unknown_tool_is_unknown_tool_naming_it(fakes: Fakes) -> None:
    with pytest.raises(DownstreamError) as caught:
        await fakes.clients.tools.resolve(["calculator", "teleporter"], CTX)
    assert caught.value.code == "unknown_tool"
    assert caught.value.retryable is False
    assert "teleporter" in caught.value.message
    assert len(fakes.tools.calls) == 1


async def test_resolve_retries_unavailable(fakes: Fakes) -> None:
    fakes.tools.unavailable = 2
    assert len(await fakes.clients.tools.resolve(["clock"], CTX)) == 1
    assert len(fakes.tools.calls) == 3


async def test_tool_registry_down_is_unavailable_naming_it(fakes: Fakes) -> None:
    fakes.tools.unavailable = 10
    with pytest.raises(DownstreamError) as caught:
        await fakes.clients.tools.resolve(["clock"], CTX)
    assert caught.value.code == "downstream_unavailable"
    assert "tool_registry service (ResolveTools at" in caught.value.message


async def test_an_answer_out_of_order_is_refused(fakes: Fakes) -> None:
    fakes.tool_service.reorder = True
    with pytest.raises(DownstreamError) as caught:
        await fakes.clients.tools.resolve(["clock", "calculator"], CTX)
    assert caught.value.code == "downstream_bad_reply"


async def test_channels_reopen_after_aclose(fakes: Fakes) -> None:
    await fakes.clients.tools.resolve(["clock"], CTX)
    await fakes.clients.aclose()
    await fakes.clients.aclose()
    assert await fakes.clients.agents.get_agent("tool-bot", CTX) is not None

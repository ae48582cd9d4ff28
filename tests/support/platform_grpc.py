"""The platform's services as one real grpc.aio server in the test process, for tests where a
real `orchestrator serve` process calls them: Agent Management (the demo agents of
tests.support.platform), Conversation (turns stored once per job id, like the real service),
Tool Registry, and a Query service that records the work it is given (the test reports the
work's notices itself). Conversation can hold its ListHistory calls, or its AppendTurns
answers after storing, until the test releases them (a process that dies meanwhile never gets
its answer)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import grpc

from agents.v1 import agents_pb2, agents_pb2_grpc
from conversation.v1 import conversation_pb2, conversation_pb2_grpc
from domain.agents import AgentKind
from query.v1 import query_pb2, query_pb2_grpc
from tests.support.platform import demo_agents
from tests.support.redis_process import free_port
from tools.v1 import tools_pb2, tools_pb2_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]

_KINDS = {
    AgentKind.LLM: agents_pb2.AGENT_KIND_LLM,
    AgentKind.TOOL_AGENT: agents_pb2.AGENT_KIND_TOOL_AGENT,
    AgentKind.WORKFLOW: agents_pb2.AGENT_KIND_WORKFLOW,
}


@dataclass
class Hold:
    """Holds calls while ``active``: ``entered`` is set when one is being held."""

    active: bool = False
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def maybe_wait(self) -> None:
        if self.active:
            self.entered.set()
            await self.release.wait()


@dataclass
class PlatformState:
    tenants: tuple[str, ...]
    # (tenant, session) -> stored turns; job ids whose turns are stored
    turns: dict[tuple[str, str], list[conversation_pb2.Turn]] = field(default_factory=dict)
    stored_jobs: set[tuple[str, str]] = field(default_factory=set)
    append_calls: list[str] = field(default_factory=list)
    history_calls: list[str] = field(default_factory=list)
    submitted: list[query_pb2.SubmitQueryRequest] = field(default_factory=list)
    submitted_event: asyncio.Event = field(default_factory=asyncio.Event)
    hold_history: Hold = field(default_factory=Hold)
    hold_append_answer: Hold = field(default_factory=Hold)


class _Agents(agents_pb2_grpc.AgentManagementServiceServicer):
    def __init__(self, state: PlatformState) -> None:
        self._state = state

    async def GetAgent(
        self, request: agents_pb2.GetAgentRequest, context: Ctx
    ) -> agents_pb2.GetAgentResponse:
        if request.tenant_id in self._state.tenants:
            for agent in demo_agents(request.tenant_id):
                if agent.agent_id == request.agent_id:
                    return agents_pb2.GetAgentResponse(
                        agent=agents_pb2.Agent(
                            tenant_id=agent.tenant_id,
                            agent_id=agent.agent_id,
                            kind=_KINDS[agent.kind],
                            model=agent.model,
                            system_prompt=agent.system_prompt,
                            tool_names=list(agent.tool_names),
                            workflow_id=agent.workflow_id,
                            limits=agents_pb2.AgentLimits(
                                max_history_turns=agent.limits.max_history_turns,
                                max_history_tokens=agent.limits.max_history_tokens,
                                max_tool_calls=agent.limits.max_tool_calls,
                            ),
                            version=agent.version,
                        )
                    )
        await context.abort(grpc.StatusCode.NOT_FOUND, f"agent {request.agent_id} not found")
        raise AssertionError("unreachable")


class _Conversation(conversation_pb2_grpc.ConversationServiceServicer):
    def __init__(self, state: PlatformState) -> None:
        self._state = state

    async def AppendTurns(
        self, request: conversation_pb2.AppendTurnsRequest, context: Ctx
    ) -> conversation_pb2.AppendTurnsResponse:
        state = self._state
        state.append_calls.append(request.job_id)
        key = (request.tenant_id, request.job_id)
        appended = key not in state.stored_jobs
        if appended:
            state.stored_jobs.add(key)
            state.turns.setdefault((request.tenant_id, request.session_id), []).extend(
                request.turns
            )
        await state.hold_append_answer.maybe_wait()
        return conversation_pb2.AppendTurnsResponse(appended=appended)

    async def ListHistory(
        self, request: conversation_pb2.ListHistoryRequest, context: Ctx
    ) -> conversation_pb2.ListHistoryResponse:
        self._state.history_calls.append(request.session_id)
        await self._state.hold_history.maybe_wait()
        turns = self._state.turns.get((request.tenant_id, request.session_id), [])
        if request.last_turns:
            turns = turns[-request.last_turns :]
        return conversation_pb2.ListHistoryResponse(turns=turns)


class _Tools(tools_pb2_grpc.ToolRegistryServiceServicer):
    async def ResolveTools(
        self, request: tools_pb2.ResolveToolsRequest, context: Ctx
    ) -> tools_pb2.ResolveToolsResponse:
        return tools_pb2.ResolveToolsResponse(
            tools=[tools_pb2.ToolDefinition(name=n, description=n) for n in request.names]
        )


class _Query(query_pb2_grpc.QueryServiceServicer):
    def __init__(self, state: PlatformState) -> None:
        self._state = state

    async def SubmitQuery(
        self, request: query_pb2.SubmitQueryRequest, context: Ctx
    ) -> query_pb2.SubmitQueryResponse:
        self._state.submitted.append(request)
        self._state.submitted_event.set()
        return query_pb2.SubmitQueryResponse(job_id=request.job_id)

    async def CancelQuery(
        self, request: query_pb2.CancelQueryRequest, context: Ctx
    ) -> query_pb2.CancelQueryResponse:
        return query_pb2.CancelQueryResponse()


class PlatformServer:
    """The fake platform on a free loopback port (``address``)."""

    def __init__(self, *tenants: str) -> None:
        self.state = PlatformState(tenants)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._server = grpc.aio.server()
        agents_pb2_grpc.add_AgentManagementServiceServicer_to_server(
            _Agents(self.state), self._server
        )
        conversation_pb2_grpc.add_ConversationServiceServicer_to_server(
            _Conversation(self.state), self._server
        )
        tools_pb2_grpc.add_ToolRegistryServiceServicer_to_server(_Tools(), self._server)
        query_pb2_grpc.add_QueryServiceServicer_to_server(_Query(self.state), self._server)
        self._server.add_insecure_port(self.address)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self) -> None:
        self.state.hold_history.release.set()
        self.state.hold_append_answer.release.set()
        await self._server.stop(grace=None)

    async def next_submit(self, timeout_s: float = 10.0) -> query_pb2.SubmitQueryRequest:
        """The first SubmitQuery not yet taken (waits for it)."""
        state = self.state
        while not state.submitted:
            state.submitted_event.clear()
            await asyncio.wait_for(state.submitted_event.wait(), timeout_s)
        return state.submitted.pop(0)

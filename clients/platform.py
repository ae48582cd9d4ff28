"""gRPC clients of the synchronous platform services a plan calls (domain.ports.platform):
Agent Management, Conversation and Tool Registry. Calls share the Query client's deadline,
metadata, retry and error mapping (clients.downstream.ServiceCaller); answers that break the
contract are refused as ``downstream_bad_reply`` (not retryable)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from agents.v1 import agents_pb2, agents_pb2_grpc
from clients.downstream import TURN_ROLES_TO_PB, DownstreamConfig, ServiceCaller, turns_to_pb
from conversation.v1 import conversation_pb2, conversation_pb2_grpc
from domain.agents import AgentConfig, AgentKind, AgentLimits, ToolDefinition
from domain.conversation import HistoryPage, HistoryWindow, Turn
from domain.dispatch import CallContext, DownstreamError
from domain.models import Service
from domain.ports.tracing import NO_TRACING, Tracing
from tools.v1 import tools_pb2, tools_pb2_grpc

_AGENT_KINDS = {
    agents_pb2.AGENT_KIND_LLM: AgentKind.LLM,
    agents_pb2.AGENT_KIND_TOOL_AGENT: AgentKind.TOOL_AGENT,
    agents_pb2.AGENT_KIND_WORKFLOW: AgentKind.WORKFLOW,
}
_ROLES = {number: role for role, number in TURN_ROLES_TO_PB.items()}


def _status(error: DownstreamError) -> grpc.StatusCode | None:
    """The gRPC status the service answered with, when it answered with one."""
    cause = error.__cause__
    return cause.code() if isinstance(cause, grpc.aio.AioRpcError) else None


def _bad_reply(service: Service, method: str, problem: str) -> DownstreamError:
    return DownstreamError(
        "downstream_bad_reply",
        f"{service.value} service ({method}) answered against its contract: {problem}",
        retryable=False,
    )


def agent_from_pb(agent: agents_pb2.Agent, tenant_id: str, agent_id: str) -> AgentConfig:
    """The domain configuration of ``agent``, which must be agent ``agent_id`` of
    ``tenant_id`` (an answer about another tenant's agent is never used)."""

    def bad(problem: str) -> DownstreamError:
        return _bad_reply(Service.AGENT_MANAGEMENT, "GetAgent", problem)

    if agent.tenant_id and agent.tenant_id != tenant_id:
        raise bad(f"asked for tenant {tenant_id!r}, got tenant {agent.tenant_id!r}")
    if agent.agent_id and agent.agent_id != agent_id:
        raise bad(f"asked for agent {agent_id!r}, got agent {agent.agent_id!r}")
    kind = _AGENT_KINDS.get(agent.kind)
    if kind is None:
        raise bad(f"agent {agent_id!r} has no known kind ({agent.kind})")
    if agent.version < 0:
        raise bad(f"agent {agent_id!r} has a negative version")
    limits = agent.limits
    if min(limits.max_history_turns, limits.max_history_tokens, limits.max_tool_calls) < 0:
        raise bad(f"agent {agent_id!r} has a negative limit")
    return AgentConfig(
        tenant_id=tenant_id,
        agent_id=agent_id,
        kind=kind,
        version=agent.version,
        model=agent.model,
        system_prompt=agent.system_prompt,
        tool_names=tuple(agent.tool_names),
        workflow_id=agent.workflow_id,
        limits=AgentLimits(
            max_history_turns=limits.max_history_turns,
            max_history_tokens=limits.max_history_tokens,
            max_tool_calls=limits.max_tool_calls,
        ),
    )


class GrpcAgentDirectory:
    """domain.ports.platform.AgentDirectory over AgentManagementService.GetAgent."""

    def __init__(self, caller: ServiceCaller) -> None:
        self._caller = caller

    async def get_agent(self, agent_id: str, ctx: CallContext) -> AgentConfig | None:
        stub: agents_pb2_grpc.AgentManagementServiceAsyncStub = self._caller.stub(
            Service.AGENT_MANAGEMENT,
            agents_pb2_grpc.AgentManagementServiceStub,
        )
        request = agents_pb2.GetAgentRequest(tenant_id=ctx.tenant_id, agent_id=agent_id)
        try:
            reply = await self._caller.unary(
                Service.AGENT_MANAGEMENT, "GetAgent", stub.GetAgent, request, ctx
            )
        except DownstreamError as error:
            if _status(error) is grpc.StatusCode.NOT_FOUND:
                return None
            raise
        if not reply.HasField("agent"):
            raise _bad_reply(Service.AGENT_MANAGEMENT, "GetAgent", "no agent in the reply")
        return agent_from_pb(reply.agent, ctx.tenant_id, agent_id)


def turn_from_pb(turn: conversation_pb2.Turn) -> Turn:
    role = _ROLES.get(turn.role)
    if role is None:
        raise _bad_reply(Service.CONVERSATION, "ListHistory", f"a turn has no role ({turn.role})")
    return Turn(
        role=role,
        content=turn.content,
        job_id=turn.job_id,
        time_ms=turn.time.ToMilliseconds() if turn.HasField("time") else 0,
        tokens=turn.tokens,
    )


class GrpcConversationStore:
    """domain.ports.platform.ConversationStore over ConversationService."""

    def __init__(self, caller: ServiceCaller) -> None:
        self._caller = caller

    def _stub(self) -> conversation_pb2_grpc.ConversationServiceAsyncStub:
        return self._caller.stub(
            Service.CONVERSATION,
            conversation_pb2_grpc.ConversationServiceStub,
        )

    async def append_turns(
        self, session_id: str, job_id: str, turns: Sequence[Turn], ctx: CallContext
    ) -> None:
        """Append once per job: the service ignores a repeat with the same job id, so a retry
        or a resumed plan never adds the turns twice."""
        request = conversation_pb2.AppendTurnsRequest(
            tenant_id=ctx.tenant_id,
            session_id=session_id,
            job_id=job_id,
            turns=turns_to_pb(turns),
            request_id=ctx.request_id,
        )
        stub = self._stub()
        await self._caller.unary(
            Service.CONVERSATION, "AppendTurns", stub.AppendTurns, request, ctx
        )

    async def list_history(
        self,
        session_id: str,
        ctx: CallContext,
        *,
        window: HistoryWindow | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> HistoryPage:
        window = window or HistoryWindow()
        request = conversation_pb2.ListHistoryRequest(
            tenant_id=ctx.tenant_id,
            session_id=session_id,
            last_turns=window.last_turns,
            token_budget=window.token_budget,
            page_size=page_size,
            page_token=page_token,
        )
        stub = self._stub()
        reply = await self._caller.unary(
            Service.CONVERSATION, "ListHistory", stub.ListHistory, request, ctx
        )
        return HistoryPage(
            turns=[turn_from_pb(turn) for turn in reply.turns],
            next_page_token=reply.next_page_token,
        )


class GrpcToolCatalog:
    """domain.ports.platform.ToolCatalog over ToolRegistryService.ResolveTools."""

    def __init__(self, caller: ServiceCaller) -> None:
        self._caller = caller

    async def resolve(self, names: Sequence[str], ctx: CallContext) -> list[ToolDefinition]:
        if not names:
            return []
        stub: tools_pb2_grpc.ToolRegistryServiceAsyncStub = self._caller.stub(
            Service.TOOL_REGISTRY,
            tools_pb2_grpc.ToolRegistryServiceStub,
        )
        request = tools_pb2.ResolveToolsRequest(tenant_id=ctx.tenant_id, names=list(names))
        try:
            reply = await self._caller.unary(
                Service.TOOL_REGISTRY, "ResolveTools", stub.ResolveTools, request, ctx
            )
        except DownstreamError as error:
            if _status(error) is grpc.StatusCode.NOT_FOUND:
                raise DownstreamError("unknown_tool", error.message, retryable=False) from error
            raise
        got = [tool.name for tool in reply.tools]
        if got != list(names):
            raise _bad_reply(
                Service.TOOL_REGISTRY, "ResolveTools", f"asked for {list(names)}, got {got}"
            )
        return [
            ToolDefinition(
                name=tool.name,
                description=tool.description,
                parameters_json=tool.parameters_json_schema,
            )
            for tool in reply.tools
        ]


@dataclass(frozen=True, slots=True)
class PlatformClients:
    """The clients of the synchronous platform services over one set of channels."""

    agents: GrpcAgentDirectory
    conversation: GrpcConversationStore
    tools: GrpcToolCatalog
    caller: ServiceCaller

    @classmethod
    def connect(cls, config: DownstreamConfig, tracing: Tracing = NO_TRACING) -> PlatformClients:
        """The clients of the services ``config`` names; channels open on first use; a
        client span per call with tracing on."""
        caller = ServiceCaller(config, tracing)
        return cls(
            agents=GrpcAgentDirectory(caller),
            conversation=GrpcConversationStore(caller),
            tools=GrpcToolCatalog(caller),
            caller=caller,
        )

    async def aclose(self) -> None:
        await self.caller.aclose()

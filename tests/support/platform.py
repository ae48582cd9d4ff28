"""In-memory stand-ins for the synchronous platform services plans call (domain.ports.platform:
Agent Management, Conversation, Tool Registry), for tests of the plan flow. Each can be taken
down (a number of calls, or until brought back) or made to hold calls until released; the
conversation store appends a job's turns once, by job id, like the real service. The gRPC
clients themselves are tested against real gRPC fakes in tests/clients."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from domain.agents import AgentConfig, AgentKind, AgentLimits, ToolDefinition
from domain.conversation import HistoryPage, HistoryWindow, Turn
from domain.dispatch import CallContext, DownstreamError
from domain.models import Service
from reference.tools import TOOLS


@dataclass
class Outage:
    """Makes a fake service fail (retryable, as a service that is down) or hold its calls."""

    service: Service
    failures: int = 0  # the next this many calls fail
    down: bool = False  # every call fails until cleared
    hold: asyncio.Event | None = None  # calls wait for it (set: released)
    held: asyncio.Event = field(default_factory=asyncio.Event)  # a call is being held
    calls: int = 0

    def fail_next(self, n: int) -> None:
        self.failures = n

    def hold_calls(self) -> asyncio.Event:
        """Hold every call until the returned event is set."""
        self.hold = asyncio.Event()
        self.held.clear()
        return self.hold

    async def enter(self) -> None:
        self.calls += 1
        if self.hold is not None and not self.hold.is_set():
            self.held.set()
            await self.hold.wait()
        if self.down or self.failures > 0:
            self.failures = max(self.failures - 1, 0)
            raise DownstreamError(
                "downstream_unavailable",
                f"{self.service.value} service unavailable (test outage)",
                retryable=True,
            )


class FakeAgents:
    """domain.ports.platform.AgentDirectory over a dict."""

    def __init__(self) -> None:
        self.agents: dict[tuple[str, str], AgentConfig] = {}
        self.outage = Outage(Service.AGENT_MANAGEMENT)

    def put(self, agent: AgentConfig) -> None:
        self.agents[(agent.tenant_id, agent.agent_id)] = agent

    async def get_agent(self, agent_id: str, ctx: CallContext) -> AgentConfig | None:
        await self.outage.enter()
        return self.agents.get((ctx.tenant_id, agent_id))


class FakeConversation:
    """domain.ports.platform.ConversationStore: each session's turns; a job's turns are
    appended once (``stored`` counts the appends that stored turns, per job)."""

    def __init__(self) -> None:
        self.turns: dict[tuple[str, str], list[Turn]] = {}
        self.stored: dict[tuple[str, str], int] = {}
        self.append_calls: list[str] = []  # job ids, one per call that reached the store
        self.outage = Outage(Service.CONVERSATION)
        self.append_outage = Outage(Service.CONVERSATION)
        # Entered once the turns are stored (an answer lost on its way back).
        self.answer_outage = Outage(Service.CONVERSATION)

    async def append_turns(
        self, session_id: str, job_id: str, turns: Sequence[Turn], ctx: CallContext
    ) -> None:
        await self.outage.enter()
        await self.append_outage.enter()
        self.append_calls.append(job_id)
        key = (ctx.tenant_id, job_id)
        if key not in self.stored:
            self.stored[key] = 1
            self.turns.setdefault((ctx.tenant_id, session_id), []).extend(turns)
        await self.answer_outage.enter()

    async def list_history(
        self,
        session_id: str,
        ctx: CallContext,
        *,
        window: HistoryWindow | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> HistoryPage:
        await self.outage.enter()
        turns = list(self.turns.get((ctx.tenant_id, session_id), []))
        if window is not None and window.last_turns:
            turns = turns[-window.last_turns :]
        return HistoryPage(turns)


class FakeTools:
    """domain.ports.platform.ToolCatalog over a dict: the reference tool catalogue."""

    def __init__(self) -> None:
        self.tools: dict[str, ToolDefinition] = {
            name: ToolDefinition(name, tool.description, tool.parameters_json_schema)
            for name, tool in TOOLS.items()
        }
        self.outage = Outage(Service.TOOL_REGISTRY)

    async def resolve(self, names: Sequence[str], ctx: CallContext) -> list[ToolDefinition]:
        await self.outage.enter()
        for name in names:
            if name not in self.tools:
                raise DownstreamError("unknown_tool", f"unknown tool {name!r}", retryable=False)
        return [self.tools[name] for name in names]


class FakePlatform:
    """The three fakes together (server.services.PlatformPorts), with demo agents of each kind
    for ``tenants``: ``support-bot`` (llm), ``tool-bot`` (tool_agent), ``research-flow``
    (workflow)."""

    def __init__(self, *tenants: str) -> None:
        self._agents = FakeAgents()
        self._conversation = FakeConversation()
        self._tools = FakeTools()
        for tenant_id in tenants:
            for agent in demo_agents(tenant_id):
                self._agents.put(agent)

    @property
    def agents(self) -> FakeAgents:
        return self._agents

    @property
    def conversation(self) -> FakeConversation:
        return self._conversation

    @property
    def tools(self) -> FakeTools:
        return self._tools


def demo_agents(tenant_id: str) -> list[AgentConfig]:
    return [
        AgentConfig(
            tenant_id,
            "support-bot",
            AgentKind.LLM,
            3,
            model="m-small",
            system_prompt="You are a support assistant.",
            limits=AgentLimits(max_history_turns=4),
        ),
        AgentConfig(
            tenant_id,
            "tool-bot",
            AgentKind.TOOL_AGENT,
            1,
            model="m-tools",
            system_prompt="Use your tools.",
            tool_names=("calculator", "clock"),
            limits=AgentLimits(max_tool_calls=5),
        ),
        AgentConfig(
            tenant_id,
            "research-flow",
            AgentKind.WORKFLOW,
            2,
            model="m-flow",
            workflow_id="retrieve-summarize-answer",
        ),
    ]

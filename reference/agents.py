"""The reference Agent Management Service: agent configurations per (tenant, agent), seeded with
demo agents of each kind for the demo tenants, and a Python API to change them that reports
AGENT_CHANGED to the orchestrator over PublishUpdates (so it drops its cached copy)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agents.v1 import agents_pb2, agents_pb2_grpc
from orchestrator.v1 import common_pb2, task_update_pb2
from reference import fields
from reference.reporter import Notice, Reporter
from reference.tools import CALCULATOR, CLOCK, TOOLS
from reference.workflows import RESEARCH_FLOW, WORKFLOWS

if TYPE_CHECKING:
    from reference.fields import Context

KINDS = ("llm", "tool_agent", "workflow")
_KIND_PROTO = {
    "llm": agents_pb2.AGENT_KIND_LLM,
    "tool_agent": agents_pb2.AGENT_KIND_TOOL_AGENT,
    "workflow": agents_pb2.AGENT_KIND_WORKFLOW,
}


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """One agent's configuration. ``version`` grows with every change."""

    tenant_id: str
    agent_id: str
    kind: str
    model: str = ""
    system_prompt: str = ""
    tool_names: tuple[str, ...] = ()
    workflow_id: str = ""
    max_history_turns: int = 0
    max_history_tokens: int = 0
    max_tool_calls: int = 0
    version: int = 1

    def check(self) -> None:
        """ValueError when the configuration could not run on the reference services."""
        if not self.tenant_id or not self.agent_id:
            raise ValueError("tenant_id and agent_id are required")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        unknown = [name for name in self.tool_names if name not in TOOLS]
        if unknown:
            raise ValueError(f"unknown tool(s): {', '.join(unknown)}")
        if self.kind == "tool_agent" and not self.tool_names:
            raise ValueError("a tool_agent needs tool_names")
        if self.kind == "workflow" and self.workflow_id not in WORKFLOWS:
            raise ValueError(f"unknown workflow_id {self.workflow_id!r}")
        limits = (self.max_history_turns, self.max_history_tokens, self.max_tool_calls)
        if min(limits) < 0 or self.version < 1:
            raise ValueError("limits must not be negative and version starts at 1")

    def to_proto(self) -> agents_pb2.Agent:
        return agents_pb2.Agent(
            tenant_id=self.tenant_id,
            agent_id=self.agent_id,
            kind=_KIND_PROTO[self.kind],
            model=self.model,
            system_prompt=self.system_prompt,
            tool_names=list(self.tool_names),
            workflow_id=self.workflow_id,
            limits=agents_pb2.AgentLimits(
                max_history_turns=self.max_history_turns,
                max_history_tokens=self.max_history_tokens,
                max_tool_calls=self.max_tool_calls,
            ),
            version=self.version,
        )


def demo_agents(tenant_id: str) -> list[AgentSpec]:
    """The demo agents every demo tenant starts with: one of each kind."""
    return [
        AgentSpec(
            tenant_id,
            "support-bot",
            "llm",
            model="reference-llm",
            system_prompt="You are a helpful support agent.",
            max_history_turns=20,
        ),
        AgentSpec(
            tenant_id,
            "tool-bot",
            "tool_agent",
            model="reference-agent",
            system_prompt="You answer with the help of a calculator and a clock.",
            tool_names=(CALCULATOR.name, CLOCK.name),
            max_history_turns=20,
            max_tool_calls=4,
        ),
        AgentSpec(
            tenant_id,
            "research-flow",
            "workflow",
            model="reference-llm",
            system_prompt="You research a question step by step.",
            workflow_id=RESEARCH_FLOW,
            max_history_turns=20,
        ),
    ]


class AgentBook:
    """The agents of every tenant. Changes through ``put_agent``, ``update_agent`` and
    ``remove_agent`` report AGENT_CHANGED for the agent through the reporter (call them on the
    services' event loop). Versions only grow, also across a removal and a new creation."""

    def __init__(self, reporter: Reporter, demo_tenants: Iterable[str] = ()) -> None:
        self._reporter = reporter
        self._agents: dict[tuple[str, str], AgentSpec] = {}
        # The last version of each removed agent: one created again continues after it.
        self._removed: dict[tuple[str, str], int] = {}
        for tenant_id in demo_tenants:
            for agent in demo_agents(tenant_id):
                self._agents[(agent.tenant_id, agent.agent_id)] = agent

    def get(self, tenant_id: str, agent_id: str) -> AgentSpec | None:
        return self._agents.get((tenant_id, agent_id))

    def put_agent(self, agent: AgentSpec) -> AgentSpec:
        """Create or replace an agent; a replaced one's version grows past the old one's."""
        key = (agent.tenant_id, agent.agent_id)
        previous = self._agents[key].version if key in self._agents else self._removed.get(key)
        if previous is not None:
            agent = dataclasses.replace(agent, version=max(agent.version, previous + 1))
        stored = self._store(agent)
        self._removed.pop(key, None)
        return stored

    def update_agent(self, tenant_id: str, agent_id: str, /, **changes: Any) -> AgentSpec:
        """Change some fields of an existing agent (KeyError if there is none) and bump its
        version."""
        current = self.get(tenant_id, agent_id)
        if current is None:
            raise KeyError(f"agent {agent_id!r} of tenant {tenant_id!r}")
        for name in ("tenant_id", "agent_id", "version"):
            if name in changes:
                raise ValueError(f"{name} cannot be changed")
        return self._store(dataclasses.replace(current, version=current.version + 1, **changes))

    def remove_agent(self, tenant_id: str, agent_id: str) -> bool:
        """Delete an agent; whether it existed."""
        removed = self._agents.pop((tenant_id, agent_id), None)
        if removed is not None:
            self._removed[(tenant_id, agent_id)] = removed.version + 1
            self._report(tenant_id, agent_id, removed.version + 1)
        return removed is not None

    def _store(self, agent: AgentSpec) -> AgentSpec:
        agent.check()
        self._agents[(agent.tenant_id, agent.agent_id)] = agent
        self._report(agent.tenant_id, agent.agent_id, agent.version)
        return agent

    def _report(self, tenant_id: str, agent_id: str, sequence: int) -> None:
        self._reporter.publish(
            Notice(
                event=task_update_pb2.NOTICE_EVENT_AGENT_CHANGED,
                service=common_pb2.SERVICE_AGENT_MANAGEMENT,
                tenant_id=tenant_id,
                agent_id=agent_id,
                sequence=sequence,
            )
        )


class AgentManagementServicer(agents_pb2_grpc.AgentManagementServiceServicer):
    def __init__(self, book: AgentBook) -> None:
        self.book = book

    async def GetAgent(
        self, request: agents_pb2.GetAgentRequest, context: Context
    ) -> agents_pb2.GetAgentResponse:
        async with fields.checked(context):
            fields.idents(request, "tenant_id", "agent_id")
            agent = self.book.get(request.tenant_id, request.agent_id)
            if agent is None:
                raise fields.NotFound("agent_id", f"no agent {request.agent_id!r}")
        return agents_pb2.GetAgentResponse(agent=agent.to_proto())

"""Agents: the configuration Agent Management keeps for each (tenant, agent), which decides the
plan a chat message becomes (domain.plans)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class AgentKind(enum.StrEnum):
    """What does the work of an agent's chat messages."""

    # One call to Query (LLM, or RAG when the message names collections).
    LLM = "llm"
    # Agent Execution runs the agent, calling its tools in a loop.
    TOOL_AGENT = "tool_agent"
    # Workflow Engine runs the agent's workflow.
    WORKFLOW = "workflow"


@dataclass(frozen=True, slots=True)
class AgentLimits:
    """Per-agent limits (0: no limit of the agent's own)."""

    max_history_turns: int = 0
    max_history_tokens: int = 0
    max_tool_calls: int = 0


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """An agent as Agent Management defines it. ``version`` grows with every change: a cached
    copy is current while its version is."""

    tenant_id: str
    agent_id: str
    kind: AgentKind
    version: int
    model: str = ""
    system_prompt: str = ""
    tool_names: tuple[str, ...] = ()
    workflow_id: str = ""
    limits: AgentLimits = AgentLimits()

    def to_json(self) -> dict[str, Any]:
        """The configuration as plain JSON values (stored with a job as its run's snapshot)."""
        return {
            "tenant_id": self.tenant_id,
            "agent_id": self.agent_id,
            "kind": self.kind.value,
            "version": self.version,
            "model": self.model,
            "system_prompt": self.system_prompt,
            "tool_names": list(self.tool_names),
            "workflow_id": self.workflow_id,
            "limits": {
                "max_history_turns": self.limits.max_history_turns,
                "max_history_tokens": self.limits.max_history_tokens,
                "max_tool_calls": self.limits.max_tool_calls,
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AgentConfig:
        limits = data.get("limits") or {}
        return cls(
            tenant_id=str(data["tenant_id"]),
            agent_id=str(data["agent_id"]),
            kind=AgentKind(data["kind"]),
            version=int(data["version"]),
            model=str(data.get("model", "")),
            system_prompt=str(data.get("system_prompt", "")),
            tool_names=tuple(str(n) for n in data.get("tool_names") or ()),
            workflow_id=str(data.get("workflow_id", "")),
            limits=AgentLimits(
                max_history_turns=int(limits.get("max_history_turns", 0)),
                max_history_tokens=int(limits.get("max_history_tokens", 0)),
                max_tool_calls=int(limits.get("max_tool_calls", 0)),
            ),
        )


@dataclass(frozen=True, slots=True)
class ToolDefinition:
    """A tool as Tool Registry resolves it: what an agent may call and how."""

    name: str
    description: str
    # The JSON schema of the tool's arguments, as JSON text.
    parameters_json: str

    def to_json(self) -> dict[str, Any]:
        """The tool as plain JSON values (a plan's recorded tool definitions)."""
        return {
            "name": self.name,
            "description": self.description,
            "parameters_json": self.parameters_json,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ToolDefinition:
        return cls(str(data["name"]), str(data["description"]), str(data["parameters_json"]))

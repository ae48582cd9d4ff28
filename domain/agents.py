"""Agents: the configuration Agent Management keeps for each (tenant, agent), which decides the
plan a chat message becomes (domain.plans)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


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


@dataclass(frozen=True, slots=True)
class ToolDefinition:
    """A tool as Tool Registry resolves it: what an agent may call and how."""

    name: str
    description: str
    # The JSON schema of the tool's arguments, as JSON text.
    parameters_json: str

"""The synchronous platform services a plan calls (domain.plans), implemented in clients/.
Asynchronous work (Query, Embedding, Agent Execution, Workflow Engine) goes through
domain.dispatch.Dispatcher. Every method raises domain.dispatch.DownstreamError when the service
cannot answer (``retryable`` says whether trying again may help)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from domain.agents import AgentConfig, ToolDefinition
from domain.conversation import HistoryPage, HistoryWindow, Turn
from domain.dispatch import CallContext


class AgentDirectory(Protocol):
    """Agent Management: the agents' configurations."""

    async def get_agent(self, agent_id: str, ctx: CallContext) -> AgentConfig | None:
        """The agent ``agent_id`` of ``ctx.tenant_id``, or None when it does not exist."""
        ...


class ConversationStore(Protocol):
    """Conversation: each session's turns."""

    async def append_turns(
        self, session_id: str, job_id: str, turns: Sequence[Turn], ctx: CallContext
    ) -> None:
        """Append the turns a job adds, once: a repeat with the same job id changes nothing."""
        ...

    async def list_history(
        self,
        session_id: str,
        ctx: CallContext,
        *,
        window: HistoryWindow | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> HistoryPage:
        """The session's turns (within ``window``, counted from the newest; None: all),
        oldest first."""
        ...


class ToolCatalog(Protocol):
    """Tool Registry: the tools agents may call."""

    async def resolve(self, names: Sequence[str], ctx: CallContext) -> list[ToolDefinition]:
        """The definitions of ``names``, in that order. Raises DownstreamError with code
        ``unknown_tool`` (not retryable) when one is not registered."""
        ...


class AgentCache(Protocol):
    """Agent configurations shared by every process of the deployment (registry/: Redis, or
    memory on the embedded default), with a time to live."""

    async def lookup(self, tenant_id: str, agent_id: str) -> tuple[AgentConfig | None, int]:
        """The cached configuration (None on a miss: never cached, expired or invalidated) and,
        on a miss, the agent's invalidation generation read after it (the one a ``put`` of a
        configuration fetched next must still find); 0 with a hit, which puts nothing."""
        ...

    async def put(self, config: AgentConfig, ttl_ms: int, *, generation: int) -> None:
        """Cache ``config`` for ``ttl_ms``, only if the agent's invalidation generation is still
        ``generation`` (the one ``lookup`` returned before the configuration was fetched): a
        fetch that raced an invalidation never caches what it read."""
        ...

    async def invalidate(self, tenant_id: str, agent_id: str) -> None:
        """Drop the cached configuration and advance the agent's generation; once this returns,
        no process reads the old configuration."""
        ...

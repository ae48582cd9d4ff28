"""The agents' configurations as the job flow reads them: Agent Management behind the shared
agent cache (domain.ports.platform.AgentCache: Redis, or memory on the embedded default).

A lookup reads the cache; a miss asks Agent Management and caches the answer for the TTL
(``ORCH_AGENT_CACHE_TTL``), unless the agent was invalidated while it was being fetched (the
cache's generation check), so a fetch that raced an invalidation never brings the old version
back. An invalidation (AdminService.InvalidateAgent, or an AGENT_CHANGED notice from Agent
Management) drops the shared entry; nothing is kept in process memory beyond one call, so
once it returns no replica serves the old version. A missing agent is not cached: an agent
created later is found at once.
"""

from __future__ import annotations

import logging
from typing import Protocol

from domain.agents import AgentConfig
from domain.dispatch import CallContext, DownstreamError
from domain.errors import InvalidArgument
from domain.ids import require_tenant_id
from domain.models import Service
from domain.ports.platform import AgentCache, AgentDirectory

log = logging.getLogger(__name__)

MAX_AGENT_ID_CHARS = 128


class AgentCacheMetrics(Protocol):
    """Where lookups are counted (the server passes the server.metrics module)."""

    def record_agent_cache(self, outcome: str) -> None: ...


def require_agent_id(value: str, field: str = "agent_id") -> str:
    """Validate an agent id argument: present, at most 128 characters (as sessions take it)."""
    if not value:
        raise InvalidArgument.field(field, "is required")
    if len(value) > MAX_AGENT_ID_CHARS:
        raise InvalidArgument.field(field, f"exceeds {MAX_AGENT_ID_CHARS} characters")
    return value


class CachedAgentDirectory:
    """domain.ports.platform.AgentDirectory over Agent Management (``inner``) and the shared
    cache. ``ttl_ms`` 0 disables caching: every lookup asks Agent Management."""

    def __init__(
        self,
        inner: AgentDirectory,
        cache: AgentCache,
        *,
        ttl_ms: int,
        metrics: AgentCacheMetrics | None = None,
    ) -> None:
        if ttl_ms < 0:
            raise ValueError("ttl_ms must not be negative")
        self._inner = inner
        self._cache = cache
        self._ttl_ms = ttl_ms
        self._metrics = metrics

    async def get_agent(self, agent_id: str, ctx: CallContext) -> AgentConfig | None:
        """The agent ``agent_id`` of ``ctx.tenant_id``, or None when Agent Management has no
        such agent. Raises DownstreamError when Agent Management cannot answer and the agent
        is not cached, domain.errors.Unavailable when the cache cannot be reached."""
        tenant_id = ctx.tenant_id
        if self._ttl_ms == 0:
            return self._checked(await self._inner.get_agent(agent_id, ctx), tenant_id, agent_id)
        cached, generation = await self._cache.lookup(tenant_id, agent_id)
        if cached is not None:
            self._count("hit")
            return cached
        self._count("miss")
        config = self._checked(await self._inner.get_agent(agent_id, ctx), tenant_id, agent_id)
        if config is not None:
            await self._cache.put(config, self._ttl_ms, generation=generation)
        return config

    async def invalidate(self, tenant_id: str, agent_id: str) -> None:
        """Drop the agent's cached configuration in every process: the next lookup anywhere
        asks Agent Management. InvalidArgument for a bad tenant or agent id."""
        require_tenant_id(tenant_id)
        require_agent_id(agent_id)
        await self._cache.invalidate(tenant_id, agent_id)
        log.info("agent %s of tenant %s invalidated", agent_id, tenant_id)

    async def on_agent_changed(self, tenant_id: str, agent_id: str) -> None:
        """The AGENT_CHANGED notice from Agent Management (the notice intake's hook)."""
        await self.invalidate(tenant_id, agent_id)

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.record_agent_cache(outcome)

    @staticmethod
    def _checked(config: AgentConfig | None, tenant_id: str, agent_id: str) -> AgentConfig | None:
        """Agent Management's answer, if it is the agent asked for: another tenant's or
        agent's configuration is never used (nor cached under this key)."""
        if config is None or (config.tenant_id, config.agent_id) == (tenant_id, agent_id):
            return config
        raise DownstreamError(
            "downstream_rejected",
            f"{Service.AGENT_MANAGEMENT.value} answered for agent {config.agent_id} of "
            f"tenant {config.tenant_id} when asked for {agent_id} of {tenant_id}",
            retryable=False,
        )

"""The cached agent directory (domain.agent_directory) over an in-memory Agent Management and
the memory agent cache: hits, misses, invalidation, a fetch racing an invalidation."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest

from domain.agent_directory import CachedAgentDirectory
from domain.agents import AgentConfig, AgentKind
from domain.dispatch import CallContext, DownstreamError
from domain.errors import InvalidArgument
from registry.agent_cache_memory import MemoryAgentCache

ACME = CallContext(tenant_id="acme", request_id="r-1")
BOT = AgentConfig("acme", "support-bot", AgentKind.LLM, version=1, model="m")


class Agents:
    """Agent Management as a dict; ``during_fetch`` runs inside a lookup (a racing change)."""

    def __init__(self, *configs: AgentConfig) -> None:
        self.configs = {(c.tenant_id, c.agent_id): c for c in configs}
        self.calls = 0
        self.down = False
        self.during_fetch: Callable[[], Awaitable[None]] | None = None

    async def get_agent(self, agent_id: str, ctx: CallContext) -> AgentConfig | None:
        self.calls += 1
        if self.down:
            raise DownstreamError("downstream_unavailable", "connection refused", retryable=True)
        found = self.configs.get((ctx.tenant_id, agent_id))
        if self.during_fetch is not None:
            hook, self.during_fetch = self.during_fetch, None
            await hook()
        return found


class Outcomes:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def record_agent_cache(self, outcome: str) -> None:
        self.counts[outcome] += 1


def directory(agents: Agents, ttl_ms: int = 60_000) -> tuple[CachedAgentDirectory, Outcomes]:
    outcomes = Outcomes()
    cached = CachedAgentDirectory(agents, MemoryAgentCache(), ttl_ms=ttl_ms, metrics=outcomes)
    return cached, outcomes


async def test_a_miss_asks_agent_management_once_then_hits() -> None:
    agents = Agents(BOT)
    cached, outcomes = directory(agents)
    assert await cached.get_agent("support-bot", ACME) == BOT
    assert await cached.get_agent("support-bot", ACME) == BOT
    assert agents.calls == 1
    assert outcomes.counts == {"miss": 1, "hit": 1}


async def test_a_missing_agent_is_not_cached() -> None:
    agents = Agents()
    cached, outcomes = directory(agents)
    assert await cached.get_agent("support-bot", ACME) is None
    agents.configs[("acme", "support-bot")] = BOT
    assert await cached.get_agent("support-bot", ACME) == BOT
    assert outcomes.counts == {"miss": 2}


async def test_after_invalidate_the_next_lookup_gets_the_new_version() -> None:
    agents = Agents(BOT)
    cached, _ = directory(agents)
    await cached.get_agent("support-bot", ACME)
    agents.configs[("acme", "support-bot")] = replace(BOT, version=2)
    assert (await cached.get_agent("support-bot", ACME)) == BOT  # cached until invalidated
    await cached.on_agent_changed("acme", "support-bot")
    assert (await cached.get_agent("support-bot", ACME)) == replace(BOT, version=2)


async def test_a_fetch_that_raced_an_invalidation_is_not_cached() -> None:
    """The fetch read version 1; the agent changed and was invalidated before the answer was
    cached: version 1 must not be served afterwards."""
    agents = Agents(BOT)
    cached, _ = directory(agents)

    async def change() -> None:
        agents.configs[("acme", "support-bot")] = replace(BOT, version=2)
        await cached.invalidate("acme", "support-bot")

    agents.during_fetch = change
    assert await cached.get_agent("support-bot", ACME) == BOT  # the call in flight
    assert await cached.get_agent("support-bot", ACME) == replace(BOT, version=2)
    assert agents.calls == 2


async def test_agent_management_down_fails_a_miss_but_not_a_hit() -> None:
    agents = Agents(BOT)
    cached, _ = directory(agents)
    agents.down = True
    with pytest.raises(DownstreamError):
        await cached.get_agent("support-bot", ACME)
    agents.down = False
    await cached.get_agent("support-bot", ACME)
    agents.down = True
    assert await cached.get_agent("support-bot", ACME) == BOT


async def test_an_answer_for_another_tenant_is_refused_and_not_cached() -> None:
    agents = Agents(replace(BOT, tenant_id="globex"))
    agents.configs[("acme", "support-bot")] = replace(BOT, tenant_id="globex")
    cached, _ = directory(agents)
    with pytest.raises(DownstreamError, match="agent_management answered"):
        await cached.get_agent("support-bot", ACME)
    with pytest.raises(DownstreamError):
        await cached.get_agent("support-bot", ACME)
    assert agents.calls == 2


async def test_ttl_zero_asks_agent_management_every_time() -> None:
    agents = Agents(BOT)
    cached, outcomes = directory(agents, ttl_ms=0)
    for _ in range(3):
        assert await cached.get_agent("support-bot", ACME) == BOT
    assert agents.calls == 3
    assert not outcomes.counts


@pytest.mark.parametrize(
    ("tenant_id", "agent_id", "field"),
    [("", "a", "tenant_id"), ("a{b}", "a", "tenant_id"), ("acme", "", "agent_id")],
)
async def test_invalidate_names_a_bad_field(tenant_id: str, agent_id: str, field: str) -> None:
    cached, _ = directory(Agents())
    with pytest.raises(InvalidArgument) as raised:
        await cached.invalidate(tenant_id, agent_id)
    assert raised.value.violations[0].field == field


async def test_invalidate_refuses_a_long_agent_id() -> None:
    cached, _ = directory(Agents())
    with pytest.raises(InvalidArgument, match="agent_id: exceeds 128"):
        await cached.invalidate("acme", "a" * 129)

"""The agent cache contract (domain.ports.platform.AgentCache), run against the memory and the
Redis backend as open_backend builds them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from domain.agents import AgentConfig, AgentKind, AgentLimits
from domain.ports.platform import AgentCache
from registry.agent_cache_memory import MemoryAgentCache
from registry.agent_codec import config_from_json, config_to_json
from registry.redis_client import create_redis
from tests.support.registries import opened_registry

HOUR_MS = 3600 * 1000

AGENT = AgentConfig(
    tenant_id="acme",
    agent_id="tool-bot",
    kind=AgentKind.TOOL_AGENT,
    version=3,
    model="m-1",
    system_prompt="You help.",
    tool_names=("calculator", "clock"),
    workflow_id="",
    limits=AgentLimits(max_history_turns=10, max_history_tokens=2000, max_tool_calls=4),
)


@pytest.fixture
async def cache(backend_url: str | None) -> AsyncIterator[AgentCache]:
    async with opened_registry(backend_url) as registry:
        yield registry.agent_cache


async def test_a_put_configuration_is_a_hit_with_every_field(cache: AgentCache) -> None:
    assert await cache.lookup("acme", "tool-bot") == (None, 0)
    await cache.put(AGENT, HOUR_MS, generation=0)
    assert await cache.lookup("acme", "tool-bot") == (AGENT, 0)


async def test_an_unknown_agent_is_a_miss(cache: AgentCache) -> None:
    await cache.put(AGENT, HOUR_MS, generation=0)
    assert await cache.lookup("acme", "other-bot") == (None, 0)


async def test_an_entry_expires_after_its_ttl(cache: AgentCache) -> None:
    await cache.put(AGENT, 1, generation=0)
    await asyncio.sleep(0.01)  # the TTL is 1 ms: time has to pass, there is no event to await
    assert await cache.lookup("acme", "tool-bot") == (None, 0)
    await cache.put(AGENT, HOUR_MS, generation=0)
    assert (await cache.lookup("acme", "tool-bot"))[0] == AGENT


async def test_invalidate_drops_the_entry_and_advances_the_generation(cache: AgentCache) -> None:
    await cache.put(AGENT, HOUR_MS, generation=0)
    await cache.invalidate("acme", "tool-bot")
    assert await cache.lookup("acme", "tool-bot") == (None, 1)
    await cache.invalidate("acme", "tool-bot")  # also when nothing is cached
    assert await cache.lookup("acme", "tool-bot") == (None, 2)
    newer = replace(AGENT, version=4)
    await cache.put(newer, HOUR_MS, generation=2)
    # A hit answers no generation: nothing is put after it.
    assert await cache.lookup("acme", "tool-bot") == (newer, 0)


async def test_a_put_that_raced_an_invalidation_is_dropped(cache: AgentCache) -> None:
    """The lookup missed, the fetch read the old configuration, an invalidation came before
    the put: the old configuration is not cached."""
    _, generation = await cache.lookup("acme", "tool-bot")
    await cache.invalidate("acme", "tool-bot")
    await cache.put(AGENT, HOUR_MS, generation=generation)
    assert await cache.lookup("acme", "tool-bot") == (None, generation + 1)
    # A fetch that started after the invalidation is cached.
    await cache.put(replace(AGENT, version=4), HOUR_MS, generation=generation + 1)
    assert (await cache.lookup("acme", "tool-bot"))[0] == replace(AGENT, version=4)


async def test_a_newer_version_is_never_replaced_by_an_older_one(cache: AgentCache) -> None:
    newer = replace(AGENT, version=7, model="m-2")
    await cache.put(newer, HOUR_MS, generation=0)
    await cache.put(AGENT, HOUR_MS, generation=0)  # version 3: a slow fetch
    assert (await cache.lookup("acme", "tool-bot"))[0] == newer
    same = replace(newer, system_prompt="refreshed")
    await cache.put(same, HOUR_MS, generation=0)  # the same version refreshes the entry
    assert (await cache.lookup("acme", "tool-bot"))[0] == same
    newest = replace(AGENT, version=8)
    await cache.put(newest, HOUR_MS, generation=0)
    assert (await cache.lookup("acme", "tool-bot"))[0] == newest


async def test_tenants_never_see_or_invalidate_each_others_agents(cache: AgentCache) -> None:
    theirs = replace(AGENT, tenant_id="globex", version=1, model="globex-model")
    await cache.put(AGENT, HOUR_MS, generation=0)
    assert await cache.lookup("globex", "tool-bot") == (None, 0)
    await cache.put(theirs, HOUR_MS, generation=0)
    await cache.invalidate("globex", "tool-bot")
    assert await cache.lookup("acme", "tool-bot") == (AGENT, 0)
    assert await cache.lookup("globex", "tool-bot") == (None, 1)
    await cache.invalidate("acme", "other-bot")  # another agent of the same tenant
    assert await cache.lookup("acme", "tool-bot") == (AGENT, 0)


async def test_redis_keys_live_in_the_tenants_slot_and_expire(redis_url: str) -> None:
    async with opened_registry(redis_url) as registry:
        await registry.agent_cache.put(AGENT, 60_000, generation=0)
        await registry.agent_cache.invalidate("acme", "other:bot")
    redis = create_redis(redis_url, socket_timeout_s=1.0, connect_timeout_s=0.5)
    try:
        keys = sorted(await redis.keys("*"))
        assert keys == ["test:{t:acme}:agent:tool-bot", "test:{t:acme}:agentgen:other:bot"]
        for key in keys:
            assert await redis.pttl(key) > 0
        assert 0 < await redis.pttl("test:{t:acme}:agent:tool-bot") <= 60_000
    finally:
        await redis.aclose()


async def test_an_entry_that_does_not_parse_is_a_miss(redis_url: str) -> None:
    async with opened_registry(redis_url) as registry:
        redis = create_redis(redis_url, socket_timeout_s=1.0, connect_timeout_s=0.5)
        try:
            await redis.hset("test:{t:acme}:agent:tool-bot", mapping={"v": "9", "c": "{"})
        finally:
            await redis.aclose()
        assert await registry.agent_cache.lookup("acme", "tool-bot") == (None, 0)


def test_the_json_form_keeps_every_field() -> None:
    assert config_from_json(config_to_json(AGENT)) == AGENT
    assert config_from_json('{"kind": "nope"}') is None


async def test_memory_entries_expire_by_its_clock_and_stay_bounded() -> None:
    now = [1_000]
    cache = MemoryAgentCache(clock=lambda: now[0], max_entries=2)
    await cache.put(AGENT, 100, generation=0)
    now[0] += 99
    assert (await cache.lookup("acme", "tool-bot"))[0] == AGENT
    now[0] += 1
    assert (await cache.lookup("acme", "tool-bot"))[0] is None
    for agent_id in ("a", "b", "c"):
        await cache.put(replace(AGENT, agent_id=agent_id), 1000, generation=0)
    assert (await cache.lookup("acme", "a"))[0] is None  # the oldest made room
    assert (await cache.lookup("acme", "c"))[0] is not None

"""The Redis Cluster backend (tests/support/redis_cluster.py, three masters): the cluster itself
refuses what is not slot-correct, so the contract suites run on it (backend "cluster") would
fail on any key outside its command's or script's slot; session events reach a follower over
sharded pub/sub, on the master that owns the session's slot."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import cast

import pytest
import redis
from redis.exceptions import ResponseError

from domain.ids import new_id
from domain.jobs import IfBusy, JobLimits, NewJob, StartedJob
from domain.models import NewSession, Service, WorkKind
from registry.backend import Backend
from registry.lua_scripts import SHEBANG
from registry.redis_client import create_redis, is_cluster
from tests.support.redis_cluster import RedisClusterProcess
from tests.support.registries import opened_registry

LIMITS = JobLimits(deadline_ms=60_000, heartbeat_ms=60_000, retention_ms=60_000)


@pytest.fixture
async def cluster_redis(cluster_url: str) -> AsyncIterator[redis.asyncio.RedisCluster]:
    made = create_redis(cluster_url, socket_timeout_s=2.0, connect_timeout_s=1.0)
    assert is_cluster(made)
    client = cast(redis.asyncio.RedisCluster, made)  # typed as Redis by create_redis
    await client.initialize()
    yield client
    await client.aclose()


def test_the_cluster_refuses_a_command_over_two_slots(
    redis_cluster: RedisClusterProcess, cluster_url: str
) -> None:
    with (
        redis.Redis(port=redis_cluster.ports[0]) as node,
        pytest.raises(ResponseError, match="don't hash to the same slot"),
    ):
        node.execute_command("SUNION", "{t:acme}:a", "{t:globex}:b")


async def test_a_script_touching_a_key_of_another_slot_is_refused_on_the_same_node(
    cluster_redis: redis.asyncio.RedisCluster,
) -> None:
    """Every script opens with a shebang (registry.lua_scripts), so even a key whose slot sits
    on the script's own node is refused: a test fails on it every time, not one run in three."""
    declared = "{t:acme}:job:1"
    node = cluster_redis.get_node_from_key(declared)
    other = next(
        f"{{t:other-{n}}}:x"
        for n in range(1000)
        if cluster_redis.get_node_from_key(f"{{t:other-{n}}}:x") == node
        and cluster_redis.keyslot(f"{{t:other-{n}}}:x") != cluster_redis.keyslot(declared)
    )
    script = f"redis.call('SET', '{other}', 1) return redis.call('GET', KEYS[1])"
    with pytest.raises(ResponseError, match="do not hash to the same slot"):
        await cluster_redis.execute_command("EVAL", SHEBANG + script, 1, declared)
    # Without the shebang Redis 7 lets it through (what the shebang is for).
    assert await cluster_redis.execute_command("EVAL", script, 1, declared) is None


def moved_replies(cluster: RedisClusterProcess) -> int:
    """MOVED replies the masters have sent so far (INFO errorstats)."""
    total = 0
    for port in cluster.ports:
        with redis.Redis(port=port) as node:
            total += node.info("errorstats").get("errorstat_MOVED", {}).get("count", 0)
    return total


async def test_a_new_clients_first_commands_go_to_their_slots_node(
    redis_cluster: RedisClusterProcess, cluster_url: str
) -> None:
    """Calls side by side on a new client: each goes straight to the node of its key's slot,
    none to a random node that answers MOVED (enough of those re-read the layout, closing the
    connections of the other calls in flight: they failed as UNAVAILABLE)."""
    before = moved_replies(redis_cluster)
    client = create_redis(cluster_url, socket_timeout_s=2.0, connect_timeout_s=1.0)
    try:
        keys = [f"{{t:tenant-{n}}}:x" for n in range(16)]
        assert await asyncio.gather(*(client.get(key) for key in keys)) == [None] * 16
    finally:
        await client.aclose()
    assert moved_replies(redis_cluster) == before


async def test_a_stores_keys_spread_over_every_master(
    cluster_url: str, cluster_redis: redis.asyncio.RedisCluster
) -> None:
    async with opened_registry(cluster_url) as registry:
        for n in range(12):
            await start(registry, f"tenant-{n}")
    per_node = [
        await cluster_redis.execute_command("DBSIZE", target_nodes=node)
        for node in cluster_redis.get_primaries()
    ]
    assert all(count > 0 for count in per_node), per_node


async def test_session_events_reach_a_follower_on_another_backend(cluster_url: str) -> None:
    """SPUBLISH from the job scripts, on the session's master, reaches the follower's reader
    of that master (SSUBSCRIBE there)."""
    async with opened_registry(cluster_url) as follower, opened_registry(cluster_url) as other:
        tenant, session_id = "acme", new_id()
        await other.sessions.create_session(
            tenant, session_id, NewSession("agent-1", "", {}, 60_000)
        )
        async with follower.events.subscribe(tenant, session_id) as feed:
            started = await start(other, tenant, session_id)
            assert await feed.wait(10)
            [event] = feed.drain()
        assert event.sequence == started.accepted.sequence
        assert event.data == started.accepted.data


async def start(registry: Backend, tenant: str, session_id: str | None = None) -> StartedJob:
    if session_id is None:
        session_id = new_id()
        await registry.sessions.create_session(
            tenant, session_id, NewSession("agent-1", "", {}, 60_000)
        )
    new = NewJob(new_id(), session_id, "agent-1", Service.QUERY, WorkKind.LLM_QUERY, "hi", "r")
    started = await registry.jobs.start_job(tenant, new, LIMITS, if_busy=IfBusy.RUN)
    assert isinstance(started, StartedJob)
    return started

"""The cluster's layout changing under a client (a slot moved to another master, a slot no
master serves): the client re-reads the layout, and calls in flight on the other masters go on.

redis-py re-reads a cluster's layout after every ``reinitialize_steps`` MOVED replies, after
CLUSTERDOWN or a slot no node serves, and when a pipeline's retry follows a lost connection,
and it does so by closing every connection of every node: a call waiting on a healthy master
then fails ("Connection closed by server", UNAVAILABLE to our callers) because another tenant's
slot moved. registry.redis_client's cluster client only marks the layout for re-reading there.

Each test holds a BLPOP in flight on one master (the stand-in for any call waiting for its
reply), changes the layout of slots another master owns, makes the client meet the change, and
checks that the BLPOP still gets its value. Private 3-master cluster per module; each test puts
the layout back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import pytest
import redis
from redis.asyncio import RedisCluster
from redis.exceptions import ClusterDownError

from registry.redis_client import create_redis
from tests.support.redis_cluster import NodeView, RedisClusterProcess, parse_cluster_nodes

pytestmark = pytest.mark.timeout(60)

BLOCK_S = 20  # the waiting call's own timeout: far longer than any test needs


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterProcess]:
    with RedisClusterProcess() as made:
        yield made


@pytest.fixture
async def client(cluster: RedisClusterProcess) -> AsyncIterator[RedisCluster]:
    cluster.flush()
    made = cast(
        RedisCluster, create_redis(cluster.url, socket_timeout_s=BLOCK_S + 10, connect_timeout_s=1)
    )
    await made.initialize()
    yield made
    await made.aclose()


def masters(cluster: RedisClusterProcess) -> list[NodeView]:
    return sorted((v for v in cluster.view() if v.is_master), key=lambda v: v.port)


def keys_on(cluster: RedisClusterProcess, master: NodeView, count: int) -> list[str]:
    """``count`` keys of ``count`` different slots that ``master`` serves."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < count:
        key = f"k{n}"
        slot = cluster.slot_of(key)
        if master.owns(slot) and slot not in found:
            found[slot] = key
        n += 1
    return list(found.values())


def on_every_master(cluster: RedisClusterProcess, *command: Any) -> None:
    for view in masters(cluster):
        with redis.Redis(port=view.port) as node:
            node.execute_command(*command)


def set_owner(cluster: RedisClusterProcess, slot: int, owner: NodeView) -> None:
    """Give an empty ``slot`` to ``owner``, told to every master (the new owner first)."""
    ordered = [owner, *(v for v in masters(cluster) if v.node_id != owner.node_id)]
    for view in ordered:
        with redis.Redis(port=view.port) as node:
            node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", owner.node_id)


def blocked_clients(master: NodeView) -> set[str]:
    """The ids of ``master``'s connections blocked in a command (CLIENT LIST flag b)."""
    with redis.Redis(port=master.port, decode_responses=True) as node:
        listed = node.execute_command("CLIENT", "LIST", "TYPE", "normal")
    return {
        fields["id"]
        for fields in (
            dict(kv.split("=", 1) for kv in line.split()) for line in listed.splitlines()
        )
        if "b" in fields["flags"]
    }


def serve(master: NodeView, slot: int) -> None:
    """``master`` serves ``slot`` again, unless a master serves it already."""
    with redis.Redis(port=master.port) as node:
        layout = parse_cluster_nodes(node.execute_command("CLUSTER", "NODES").decode())
        if not any(view.owns(slot) for view in layout):
            node.execute_command("CLUSTER", "ADDSLOTS", slot)


@contextmanager
def slot_unserved(
    cluster: RedisClusterProcess, master: NodeView
) -> Iterator[tuple[str, Callable[[], None]]]:
    """A slot of ``master`` that no master serves, the cluster serving the others: yields a
    key of it and what has ``master`` serve it again (done on the way out in any case, and
    full coverage required again)."""
    lost_key = keys_on(cluster, master, 1)[0]
    slot = cluster.slot_of(lost_key)
    on_every_master(cluster, "CONFIG", "SET", "cluster-require-full-coverage", "no")
    try:
        with redis.Redis(port=master.port) as node:
            node.execute_command("CLUSTER", "DELSLOTS", slot)
        yield lost_key, partial(serve, master, slot)
    finally:
        serve(master, slot)
        on_every_master(cluster, "CONFIG", "SET", "cluster-require-full-coverage", "yes")


async def blocked_on(master: NodeView) -> set[str]:
    """Once ``master`` has a client blocked (the BLPOP arrived): its connection's id."""
    while not (blocked := blocked_clients(master)):  # noqa: ASYNC110 (another process)
        await asyncio.sleep(0.01)
    return blocked


@dataclass
class WaitingCall:
    """A BLPOP in flight on ``master`` (the task awaiting its reply, on connection
    ``connection`` there)."""

    master: NodeView
    key: str
    call: asyncio.Task[Any]
    connection: set[str]

    async def answered(self) -> Any:
        """Its reply once its key gets a value, checked to come over the connection it was
        sent on: a call redis-py sent again after its connection was closed does not count."""
        assert blocked_clients(self.master) == self.connection, "its connection was closed"
        with redis.Redis(port=self.master.port) as node:
            node.lpush(self.key, "value")
        return await asyncio.wait_for(self.call, 5)


async def waiting_call(
    client: RedisCluster, cluster: RedisClusterProcess, master: NodeView
) -> WaitingCall:
    key = keys_on(cluster, master, 1)[0]

    async def pop() -> Any:
        return await client.blpop([key], timeout=BLOCK_S)

    call = asyncio.create_task(pop())
    return WaitingCall(master, key, call, await blocked_on(master))


async def test_slots_moving_to_another_master_leave_calls_in_flight_alone(
    client: RedisCluster, cluster: RedisClusterProcess
) -> None:
    """A reshard: five slots move from the first master to the third; the client's calls for
    them are answered MOVED (five of them: redis-py's re-read of the layout) and then served by
    the new owner, while a call on the second master waits for its reply."""
    first, second, third = masters(cluster)
    waiting = await waiting_call(client, cluster, second)
    moved = keys_on(cluster, first, client.reinitialize_steps)
    try:
        for moved_key in moved:
            set_owner(cluster, cluster.slot_of(moved_key), third)
        for moved_key in moved:
            await client.set(moved_key, "x")
        assert await waiting.answered() == [waiting.key, "value"]
        with redis.Redis(port=third.port) as node:
            assert [node.get(moved_key) for moved_key in moved] == [b"x"] * len(moved)
    finally:
        waiting.call.cancel()
        cluster.flush()
        for moved_key in moved:
            set_owner(cluster, cluster.slot_of(moved_key), first)


async def test_a_slot_no_master_serves_fails_its_own_call_only(
    client: RedisCluster, cluster: RedisClusterProcess
) -> None:
    """CLUSTERDOWN for one slot (its master dropped it; the cluster serves the others): the
    call for that slot fails, the call waiting on another master does not, and the slot is
    served again once a master takes it."""
    first, second, _ = masters(cluster)
    waiting = await waiting_call(client, cluster, second)
    try:
        with slot_unserved(cluster, first) as (lost_key, serve_again):
            with pytest.raises(ClusterDownError):
                await client.set(lost_key, "x")
            assert await waiting.answered() == [waiting.key, "value"]
            serve_again()
            assert await client.set(lost_key, "x")
    finally:
        waiting.call.cancel()


async def test_a_pipeline_meeting_a_slot_no_master_serves_leaves_calls_in_flight_alone(
    client: RedisCluster, cluster: RedisClusterProcess
) -> None:
    """The same through a pipeline (the stores' round trips), whose retries re-read the
    layout their own way."""
    first, second, _ = masters(cluster)
    waiting = await waiting_call(client, cluster, second)
    try:
        with slot_unserved(cluster, first) as (lost_key, serve_again):
            pipe = client.pipeline(transaction=False)
            pipe.set(lost_key, "x")
            with pytest.raises(ClusterDownError):
                await pipe.execute()
            assert await waiting.answered() == [waiting.key, "value"]
            serve_again()
            pipe = client.pipeline(transaction=False)
            pipe.set(lost_key, "x")
            assert await pipe.execute() == [True]
    finally:
        waiting.call.cancel()

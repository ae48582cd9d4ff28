"""The sharded Redis work queue (registry.redis_queue): shards in slots of their own spread over
a cluster's masters, the priority and tenant-fairness rules across shards, and items queued in
the unsharded layout running after an upgrade to several shards."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import cast

import pytest
import redis

from domain.ports.queue import QueuePriority, WorkItem, WorkQueue
from domain.worker import QueueWorker
from registry.keys import KeySpace, queue_shard_of, queue_shard_tag
from registry.redis_client import create_redis
from registry.redis_queue import RedisWorkQueue
from tests.registry.queue_fixtures import CONFIG, LEASE_MS, new_item, open_queue

pytestmark = pytest.mark.timeout(60)

SHARDS = 8


def tenants_in_distinct_shards(shards: int, count: int) -> list[str]:
    """``count`` tenant ids, each in a shard of its own."""
    found: dict[int, str] = {}
    for n in range(10_000):
        found.setdefault(queue_shard_of(f"tenant-{n}", shards), f"tenant-{n}")
        if len(found) == count:
            return list(found.values())
    raise AssertionError("not enough shards")


@pytest.fixture(params=["redis", "cluster"])
def sharded_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture
async def queue(sharded_url: str) -> AsyncIterator[RedisWorkQueue]:
    async with open_queue(sharded_url, shards=SHARDS) as opened:
        assert isinstance(opened, RedisWorkQueue)
        yield opened


async def take(queue: WorkQueue, count: int = 1, consumer: str = "c1") -> list[str]:
    items = await queue.dequeue(consumer, count=count, lease_ms=LEASE_MS)
    return [item.item_id for item in items]


async def test_the_shards_spread_over_every_master_of_the_cluster(cluster_url: str) -> None:
    client = cast(
        redis.asyncio.RedisCluster,
        create_redis(cluster_url, socket_timeout_s=2.0, connect_timeout_s=1.0),
    )
    try:
        await client.initialize()
        prefixes = [KeySpace("test").work_queue("work", shard) for shard in range(SHARDS)]
        slots = [int(await client.execute_command("CLUSTER KEYSLOT", p)) for p in prefixes]
        nodes = [client.get_node_from_key(p) for p in prefixes]
        masters = {node.name for node in nodes if node is not None}
    finally:
        await client.aclose()
    assert len(set(slots)) == SHARDS
    assert len(masters) == 3
    assert prefixes[0] == "test:{q:work}:"  # shard 0 keeps the unsharded layout


def test_a_shard_tag_does_not_depend_on_the_shard_count() -> None:
    # Growing the count keeps every existing shard where it is.
    assert queue_shard_tag("work", 3) == queue_shard_tag("work", 3)
    assert [queue_shard_tag("work", n) for n in range(4)] == [
        queue_shard_tag("work", n) for n in range(8)
    ][:4]
    assert queue_shard_tag("work", 0) == "q:work"


async def test_a_tenant_keeps_its_items_in_one_shard(queue: RedisWorkQueue) -> None:
    await queue.enqueue([new_item(f"i{n}", "acme") for n in range(5)])
    home = queue.shard_of("acme")
    for shard, prefix in enumerate(queue.prefixes):
        held = [await queue.redis.exists(f"{prefix}i:i{n}") for n in range(5)]
        assert held == [1 if shard == home else 0] * 5, shard


async def test_a_higher_priority_item_in_any_shard_is_served_first(
    queue: RedisWorkQueue,
) -> None:
    low, normal, high = tenants_in_distinct_shards(SHARDS, 3)
    await queue.enqueue([new_item(f"low{n}", low, QueuePriority.LOW) for n in range(3)])
    await queue.enqueue([new_item(f"normal{n}", normal) for n in range(3)])
    await queue.enqueue([new_item("high", high, QueuePriority.HIGH)])
    assert await take(queue) == ["high"]
    assert await take(queue, count=4) == ["normal0", "normal1", "normal2", "low0"]


async def test_a_tenant_alone_in_its_shard_is_served_within_two_dequeues(
    queue: RedisWorkQueue,
) -> None:
    big, small = tenants_in_distinct_shards(SHARDS, 2)
    for start in range(0, 10_000, 1000):
        await queue.enqueue([new_item(f"b{n}", big) for n in range(start, start + 1000)])
    await queue.enqueue([new_item("s0", small)])
    assert "s0" in [*await take(queue), *await take(queue)]
    # And in a batch: the small tenant's item in the first two places of it.
    await queue.enqueue([new_item("s1", small)])
    assert "s1" in (await take(queue, count=10))[:2]


async def test_tenants_of_crowded_and_lone_shards_get_equal_turns(
    queue: RedisWorkQueue,
) -> None:
    # Three tenants share one shard, one is alone in another: each gets a quarter of the
    # turns, not the lone tenant half of them.
    shard = queue.shard_of("tenant-0")
    crowd = [t for t in (f"tenant-{n}" for n in range(1000)) if queue.shard_of(t) == shard][:3]
    lone = next(t for t in (f"tenant-{n}" for n in range(1000)) if queue.shard_of(t) != shard)
    await queue.enqueue([new_item(f"{t}/{n}", t) for t in [*crowd, lone] for n in range(10)])
    served = Counter(item_id.split("/")[0] for item_id in await take(queue, count=8))
    assert served == Counter({t: 2 for t in [*crowd, lone]})
    one_by_one: Counter[str] = Counter()
    for _ in range(8):
        one_by_one.update(item_id.split("/")[0] for item_id in await take(queue))
    assert one_by_one == Counter({t: 2 for t in [*crowd, lone]})


async def test_items_queued_unsharded_all_run_once_after_the_upgrade(sharded_url: str) -> None:
    # Before: one shard (the layout of every release before sharding), items in each state a
    # running system leaves behind: queued, leased by a worker that then stops, waiting for a
    # retry, dead.
    tenants = [f"tenant-{n}" for n in range(12)]
    async with open_queue(sharded_url, shards=1) as old:
        await old.enqueue([new_item(f"{t}/{n}", t) for t in tenants for n in range(5)])
        leased = await old.dequeue("old-worker", count=6, lease_ms=LEASE_MS)
        failing = await old.dequeue("old-worker", count=2, lease_ms=LEASE_MS)
        for item in failing:
            await old.fail(item, "transient")
        dead = await old.dequeue("old-worker", count=1, lease_ms=LEASE_MS)
        await old.fail(dead[0], "fatal", retry=False)
    assert len(leased) == 6 and len(failing) == 2
    expected = {f"{t}/{n}" for t in tenants for n in range(5)}
    # After: the same queue with eight shards, and more work arriving in the new layout.
    async with open_queue(sharded_url, CONFIG, shards=SHARDS) as new:
        assert await new.redrive(dead[0].item_id)
        await new.enqueue([new_item(f"{t}/new", t) for t in tenants])
        expected |= {f"{t}/new" for t in tenants}
        runs: Counter[str] = Counter()

        async def handle(item: WorkItem) -> bytes:
            runs[item.item_id] += 1
            return b"ok"

        worker = QueueWorker(new, handle, concurrency=8, lease_s=LEASE_MS / 1000, poll_s=0.05)
        running = asyncio.create_task(worker.run())
        try:
            results = await asyncio.gather(*(new.wait_result(i, 20) for i in sorted(expected)))
        finally:
            worker.stop()
            await running
        assert all(r is not None and r.value == b"ok" for r in results)
        assert runs == Counter(dict.fromkeys(expected, 1))
        assert (await new.stats()).dead == 0
        # Each item's result was stored once (a redelivery only finds it finished).
        assert all(r is not None and r.deliveries <= 2 for r in results)


async def test_a_fresh_view_of_the_shards_learns_of_work_from_the_notices(
    sharded_url: str,
) -> None:
    # A consumer that waits (its listener subscribed) trusts its view of the shards for a
    # while instead of peeking at every shard; work another process enqueues reaches that view
    # by its ready notice, so the higher level it brings is served first.
    low, high = tenants_in_distinct_shards(SHARDS, 2)
    async with (
        open_queue(sharded_url, shards=SHARDS) as consumer,
        open_queue(sharded_url, shards=SHARDS) as producer,
    ):
        assert isinstance(consumer, RedisWorkQueue)
        await producer.enqueue([new_item(f"low{n}", low, QueuePriority.LOW) for n in range(3)])
        first = await consumer.dequeue("c1", count=1, lease_ms=LEASE_MS, wait_ms=1000)
        assert [i.item_id for i in first] == ["low0"]
        notified = consumer._listener.work_ready  # the event a waiting dequeue wakes on
        notified.clear()
        await producer.enqueue([new_item("high", high, QueuePriority.HIGH)])
        await asyncio.wait_for(notified.wait(), 5)
        assert await take(consumer) == ["high"]
        assert await take(consumer) == ["low1"]


async def test_a_renewal_across_shards_answers_in_the_callers_order(
    queue: RedisWorkQueue,
) -> None:
    tenants = tenants_in_distinct_shards(SHARDS, 4)
    await queue.enqueue([new_item("x", tenants[0])])
    [stale] = await queue.dequeue("c1", count=1, lease_ms=LEASE_MS)
    await asyncio.sleep(LEASE_MS / 1000 * 1.5)  # the lease expires
    [reclaimed] = await queue.dequeue("c2", count=1, lease_ms=LEASE_MS)
    assert reclaimed.item_id == "x"
    await queue.enqueue([new_item(f"{t}/{n}", t) for t in tenants for n in range(2)])
    held: dict[str, WorkItem] = {}
    while len(held) < 8:
        held |= {i.item_id: i for i in await queue.dequeue("c1", count=8, lease_ms=LEASE_MS)}
    # Shards interleaved, the stale delivery and another consumer's one of the same shard
    # among them: each answer lands at its own delivery's place.
    order = [f"{tenants[s]}/{n}" for n in (1, 0) for s in (3, 0, 2, 1)]
    asked = [*order[:3], "stale", *order[3:6], "reclaimed", *order[6:]]
    items = {**held, "stale": stale, "reclaimed": reclaimed}
    answers = await queue.renew([items[name] for name in asked])
    assert answers == [name != "stale" for name in asked]

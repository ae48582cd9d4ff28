"""The Redis work queue's streams hold exactly the entries not yet acknowledged: completion
deletes the acknowledged ones (trimming those older than every pending entry, deleting the
others one by one) and never an entry still pending or not yet delivered."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from domain.ports.queue import QueuePriority, WorkItem
from registry.keys import work_stream_key
from registry.redis_queue import RedisWorkQueue
from tests.registry.queue_fixtures import LEASE_MS, new_item, open_queue

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def queue(redis_url: str) -> AsyncIterator[RedisWorkQueue]:
    async with open_queue(redis_url, shards=1) as opened:
        assert isinstance(opened, RedisWorkQueue)
        yield opened


async def take(queue: RedisWorkQueue, consumer: str, count: int) -> list[WorkItem]:
    return await queue.dequeue(consumer, count=count, lease_ms=LEASE_MS)


async def entries(queue: RedisWorkQueue) -> list[str]:
    """The entry ids in tenant t1's stream, oldest first."""
    stream = work_stream_key(queue.prefix, QueuePriority.NORMAL, "t1")
    found: list[tuple[bytes, Any]] = await queue.redis.xrange(stream)  # type: ignore[assignment]
    return [entry.decode() for entry, _ in found]


async def test_completing_out_of_order_deletes_only_the_acknowledged_entries(
    queue: RedisWorkQueue,
) -> None:
    await queue.enqueue([new_item(f"i{n}") for n in range(6)])
    all_entries = await entries(queue)
    i0, i1, i2 = await take(queue, "c1", 3)
    # i0 is older than the oldest pending entry (i1), i2 newer: both go, i1 and the
    # undelivered i3..i5 stay.
    assert await queue.complete([(i2, b"ok"), (i0, b"ok")]) == [True, True]
    assert await entries(queue) == [all_entries[n] for n in (1, 3, 4, 5)]
    [i3] = await take(queue, "c2", 1)  # another consumer's pending entry
    assert await queue.complete([(i1, b"ok")]) == [True]
    assert await entries(queue) == all_entries[3:]
    # Nothing pending once i3 is acknowledged: the undelivered entries stay.
    assert await queue.complete([(i3, b"ok")]) == [True]
    assert await entries(queue) == all_entries[4:]
    assert await queue.complete([(item, b"ok") for item in await take(queue, "c1", 5)]) == [
        True,
        True,
    ]
    assert await entries(queue) == []
    assert await queue.redis.smembers(queue.prefix + "streams") == set()


async def test_a_stale_receipt_deletes_no_entry_of_the_stream(queue: RedisWorkQueue) -> None:
    await queue.enqueue([new_item("i0"), new_item("i1"), new_item("i2")])
    i0, i1 = await take(queue, "c1", 2)
    assert await queue.complete([(i0, b"ok")]) == [True]
    left = await entries(queue)
    # i0's entry is gone already: completing it again acknowledges nothing and deletes
    # nothing, neither i1's pending entry nor i2's undelivered one.
    assert await queue.complete([(i0, b"again")]) == [False]
    assert await entries(queue) == left
    assert await queue.complete([(i1, b"ok")]) == [True]
    assert len(await entries(queue)) == 1


async def test_with_nothing_pending_only_delivered_entries_are_trimmed(
    queue: RedisWorkQueue,
) -> None:
    # Even when an entry went missing while leased (deleted behind the queue's back), the
    # entries trimmed are those up to the last one delivered: the undelivered stay.
    await queue.enqueue([new_item("i0"), new_item("i1"), new_item("i2")])
    i0, i1 = await take(queue, "c1", 2)
    stream = work_stream_key(queue.prefix, QueuePriority.NORMAL, "t1")
    assert await queue.redis.xdel(stream, i1.receipt) == 1
    assert await queue.complete([(i0, b"ok"), (i1, b"ok")]) == [True, True]
    assert [item.item_id for item in await take(queue, "c1", 5)] == ["i2"]

"""The WorkQueue contract: every backend must pass every test here: memory, one Redis with the
queue in one shard and in four, and a Redis Cluster with the default eight shards (spread over
its masters)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from domain.ports.queue import (
    FailOutcome,
    QueuePriority,
    QueueStats,
    ResultStatus,
    WorkItem,
    WorkQueue,
)
from tests.registry.queue_fixtures import CONFIG, LEASE_MS, new_item, open_queue

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(params=["memory", "redis", "redis-4-shards", "cluster"])
def queue_backend(request: pytest.FixtureRequest) -> tuple[str | None, int | None]:
    """The backend's URL (None: memory) and the Redis queue's shard count (None: the default,
    1 on one Redis, 8 on the cluster)."""
    if request.param == "memory":
        return None, None
    if request.param == "cluster":
        return str(request.getfixturevalue("cluster_url")), None
    return str(
        request.getfixturevalue("redis_url")
    ), 4 if request.param == "redis-4-shards" else None


@pytest.fixture
async def queue(queue_backend: tuple[str | None, int | None]) -> AsyncIterator[WorkQueue]:
    url, shards = queue_backend
    async with open_queue(url, shards=shards) as opened:
        yield opened


async def take(queue: WorkQueue, consumer: str = "c1", count: int = 1) -> list[WorkItem]:
    return await queue.dequeue(consumer, count=count, lease_ms=LEASE_MS)


async def take_one(queue: WorkQueue, consumer: str = "c1", wait_ms: int = 0) -> WorkItem:
    items = await queue.dequeue(consumer, count=1, lease_ms=LEASE_MS, wait_ms=wait_ms)
    assert len(items) == 1, items
    return items[0]


async def wait_lease_expiry() -> None:
    """Lease expiry is a matter of time: wait a bit more than one lease."""
    await asyncio.sleep(LEASE_MS / 1000 * 1.5)


async def test_item_round_trip_keeps_payload_and_metadata(queue: WorkQueue) -> None:
    payload = bytes(range(256))
    assert await queue.enqueue([new_item("i1", "t9", QueuePriority.LOW, payload, "b1")]) == 1
    item = await take_one(queue)
    assert (item.item_id, item.tenant_id, item.kind) == ("i1", "t9", "test")
    assert (item.payload, item.priority, item.batch_id) == (payload, QueuePriority.LOW, "b1")
    assert item.deliveries == 1
    assert item.consumer == "c1"
    assert item.enqueued_at_ms > 0
    assert await queue.complete([(item, b"\x00result")]) == [True]
    result = await queue.get_result("i1")
    assert result is not None
    assert (result.status, result.value, result.error) == (
        ResultStatus.SUCCEEDED,
        b"\x00result",
        None,
    )
    assert result.deliveries == 1
    assert await queue.stats() == QueueStats(0, 0, 0, 0)


async def test_enqueue_is_idempotent_per_item_id(queue: WorkQueue) -> None:
    assert await queue.enqueue([new_item("i1"), new_item("i1"), new_item("i2")]) == 2
    assert await queue.enqueue([new_item("i1")]) == 0
    items = await take(queue, count=10)
    assert sorted(i.item_id for i in items) == ["i1", "i2"]
    await queue.complete([(i, b"ok") for i in items])
    assert await queue.enqueue([new_item("i1")]) == 0  # finished, result still kept
    assert await take(queue) == []


async def test_higher_priority_is_served_first(queue: WorkQueue) -> None:
    await queue.enqueue(
        [
            new_item("low", priority=QueuePriority.LOW),
            new_item("normal", priority=QueuePriority.NORMAL),
            new_item("high", priority=QueuePriority.HIGH),
            new_item("high2", "t2", priority=QueuePriority.HIGH),
        ]
    )
    order = [(await take_one(queue)).item_id for _ in range(4)]
    # t1 and t2 take turns within the level (in whichever order their shards come).
    assert sorted(order[:2]) == ["high", "high2"]
    assert order[2:] == ["normal", "low"]


async def test_items_of_one_tenant_come_in_order(queue: WorkQueue) -> None:
    await queue.enqueue([new_item(f"i{n}") for n in range(20)])
    items = await take(queue, count=20)
    assert [i.item_id for i in items] == [f"i{n}" for n in range(20)]


async def test_tenants_take_turns_within_a_level(queue: WorkQueue) -> None:
    await queue.enqueue(
        [new_item(f"a{n}", "A") for n in range(3)]
        + [new_item(f"b{n}", "B") for n in range(3)]
        + [new_item("c0", "C")]
    )
    order = [(await take_one(queue)).item_id for _ in range(7)]
    # One turn each while they have items; each tenant's own items in order.
    assert [sorted(order[:3]), sorted(order[3:5]), sorted(order[5:])] == [
        ["a0", "b0", "c0"],
        ["a1", "b1"],
        ["a2", "b2"],
    ]


async def test_a_big_tenant_does_not_starve_a_small_one(queue: WorkQueue) -> None:
    for start in range(0, 10_000, 1000):
        await queue.enqueue([new_item(f"a{n}", "A") for n in range(start, start + 1000)])
    await queue.enqueue([new_item("b0", "B")])
    first = [(await take_one(queue)).item_id for _ in range(3)]
    assert "b0" in first, first
    # And in one batched dequeue too.
    await queue.enqueue([new_item("b1", "B")])
    batch = await take(queue, count=5)
    assert "b1" in [i.item_id for i in batch[:2]]


async def test_completion_is_compare_and_set(queue: WorkQueue) -> None:
    await queue.enqueue([new_item("i1")])
    item = await take_one(queue)
    assert await queue.complete([(item, b"first")]) == [True]
    assert await queue.complete([(item, b"second")]) == [False]
    result = await queue.get_result("i1")
    assert result is not None
    assert result.value == b"first"


async def test_an_expired_lease_is_reclaimed_by_another_consumer(queue: WorkQueue) -> None:
    await queue.enqueue([new_item("i1")])
    first = await take_one(queue, "dead-worker")
    assert await take(queue, "c2") == []  # leased: not delivered twice
    await wait_lease_expiry()
    second = await take_one(queue, "c2")
    assert second.item_id == "i1"
    assert second.deliveries == 2
    assert second.consumer == "c2"
    assert first.deliveries == 1
    # The first consumer no longer holds it.
    assert await queue.renew([first]) == [False]
    assert await queue.fail(first, "late failure") is FailOutcome.IGNORED
    assert await queue.release(first) is False
    assert await queue.complete([(second, b"ok")]) == [True]
    assert await queue.stats() == QueueStats(0, 0, 0, 0)


async def test_a_finished_item_redelivered_is_only_acknowledged(queue: WorkQueue) -> None:
    await queue.enqueue([new_item("i1")])
    slow = await take_one(queue, "slow")
    await wait_lease_expiry()
    again = await take_one(queue, "c2")
    assert again.deliveries == 2
    # The slow consumer finishes first: its result wins; the redelivery's result is discarded.
    assert await queue.complete([(slow, b"slow")]) == [True]
    assert await queue.complete([(again, b"again")]) == [False]
    result = await queue.get_result("i1")
    assert result is not None
    assert result.value == b"slow"
    assert await queue.stats() == QueueStats(0, 0, 0, 0)
    await wait_lease_expiry()
    assert await take(queue, "c3") == []


async def test_renewing_keeps_long_items_from_being_reclaimed(queue: WorkQueue) -> None:
    # Several deliveries (of tenants that may sit in different shards) renewed in one call.
    await queue.enqueue([new_item(f"i{n}", f"t{n}") for n in range(4)])
    items = await take(queue, count=4)
    assert len(items) == 4
    deadline = time.monotonic() + LEASE_MS / 1000 * 3
    checked = 0
    while time.monotonic() < deadline or checked == 0:
        assert await queue.renew(items) == [True] * 4
        renewed = time.monotonic()
        await asyncio.sleep(LEASE_MS / 1000 / 3)
        # A loop stalled past the lease (a loaded machine) proves nothing either way.
        if time.monotonic() - renewed < LEASE_MS / 1000 * 0.8:
            assert await take(queue, "c2", count=4) == []
            checked += 1
    assert await queue.complete([(item, b"ok") for item in items]) == [True] * 4


async def test_renewal_answers_for_each_delivery_in_the_callers_order(queue: WorkQueue) -> None:
    await queue.enqueue([new_item("lost", "t1")])
    first = await take_one(queue, "c1")
    await wait_lease_expiry()
    second = await take_one(queue, "c2")  # c2 reclaims it; c1's delivery no longer holds it
    await queue.enqueue([new_item("a", "t2"), new_item("b", "t3")])
    a, b = sorted(await take(queue, "c1", count=2), key=lambda item: item.item_id)
    # Only the reclaimed delivery answers False, at its own place; another consumer's delivery
    # in the same call is renewed for that consumer.
    assert await queue.renew([a, first, b, second]) == [True, False, True, True]
    assert await queue.renew([first, b, a]) == [False, True, True]
    assert await queue.complete([(second, b"ok"), (a, b"ok"), (b, b"ok")]) == [True] * 3


async def test_renewing_no_delivery_answers_nothing(queue: WorkQueue) -> None:
    assert await queue.renew([]) == []


async def test_failures_retry_with_backoff_then_go_to_the_dead_letter(queue: WorkQueue) -> None:
    await queue.enqueue([new_item("i1", batch_id="b1")])
    item = await take_one(queue)
    delays: list[float] = []
    for delivery in range(1, CONFIG.max_deliveries):
        assert item.deliveries == delivery
        failed_at = time.monotonic()
        assert await queue.fail(item, f"boom {delivery}") is FailOutcome.RETRY_SCHEDULED
        assert (await queue.stats()).delayed == 1
        assert await take(queue) == []  # not before the backoff
        item = await take_one(queue, wait_ms=5000)
        delays.append(time.monotonic() - failed_at)
    assert delays[0] >= CONFIG.retry_delay_ms(1) / 1000 * 0.8
    assert delays[1] >= CONFIG.retry_delay_ms(2) / 1000 * 0.8
    assert await queue.fail(item, "boom 3") is FailOutcome.DEAD_LETTERED
    result = await queue.wait_result("i1", 1.0)
    assert result is not None
    assert (result.status, result.value, result.error) == (ResultStatus.FAILED, None, "boom 3")
    dead = await queue.list_dead()
    assert [(d.item_id, d.deliveries, d.error, d.batch_id) for d in dead] == [
        ("i1", CONFIG.max_deliveries, "boom 3", "b1")
    ]
    assert await queue.stats() == QueueStats(0, 0, 0, 1)


async def test_a_redriven_item_runs_again_with_its_count_reset(queue: WorkQueue) -> None:
    await queue.enqueue([new_item("i1", payload=b"p")])
    item = await take_one(queue)
    assert await queue.fail(item, "bad input", retry=False) is FailOutcome.DEAD_LETTERED
    assert await queue.redrive("i1") is True
    assert await queue.redrive("i1") is False  # no longer dead
    assert await queue.redrive("missing") is False
    assert await queue.list_dead() == []
    again = await take_one(queue)
    assert (again.deliveries, again.payload) == (1, b"p")
    assert await queue.complete([(again, b"fixed")]) == [True]
    result = await queue.get_result("i1")
    assert result is not None
    assert (result.status, result.value, result.error) == (ResultStatus.SUCCEEDED, b"fixed", None)


async def test_an_item_whose_lease_keeps_expiring_goes_to_the_dead_letter(
    queue: WorkQueue,
) -> None:
    await queue.enqueue([new_item("i1")])
    for delivery in range(1, CONFIG.max_deliveries + 1):
        item = await take_one(queue, f"crashing-{delivery}")
        assert item.deliveries == delivery
        await wait_lease_expiry()
    assert await take(queue, "c9") == []
    dead = await queue.list_dead()
    assert [(d.item_id, d.deliveries) for d in dead] == [("i1", CONFIG.max_deliveries)]
    result = await queue.get_result("i1")
    assert result is not None
    assert result.status is ResultStatus.FAILED


async def test_dead_letter_lists_in_pages(queue: WorkQueue) -> None:
    await queue.enqueue([new_item(f"i{n}") for n in range(5)])
    for item in await take(queue, count=5):
        await queue.fail(item, "no", retry=False)
    first = await queue.list_dead(limit=3)
    assert [d.item_id for d in first] == ["i0", "i1", "i2"]
    rest = await queue.list_dead(limit=3, after=first[-1].position)
    assert [d.item_id for d in rest] == ["i3", "i4"]


async def test_a_released_item_is_ready_again_and_not_counted(queue: WorkQueue) -> None:
    await queue.enqueue([new_item("i1")])
    item = await take_one(queue)
    assert await queue.release(item) is True
    assert await queue.release(item) is False
    again = await take_one(queue, "c2")
    assert (again.item_id, again.deliveries) == ("i1", 1)
    assert await queue.complete([(item, b"stale")]) == [True]  # first result still wins
    assert await queue.complete([(again, b"late")]) == [False]


async def test_wait_result_returns_when_the_item_finishes(queue: WorkQueue) -> None:
    await queue.enqueue([new_item("i1")])
    waiters = [asyncio.create_task(queue.wait_result("i1", 10.0)) for _ in range(3)]
    item = await take_one(queue)
    await asyncio.sleep(0.05)  # let the waiters start waiting
    assert not any(w.done() for w in waiters)
    started = time.monotonic()
    await queue.complete([(item, b"ok")])
    results = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert time.monotonic() - started < 2
    assert [r.value if r else None for r in results] == [b"ok"] * 3


async def test_wait_result_times_out_with_none(queue: WorkQueue) -> None:
    await queue.enqueue([new_item("i1")])
    started = time.monotonic()
    assert await queue.wait_result("i1", 0.2) is None
    assert 0.15 < time.monotonic() - started < 2
    assert await queue.get_result("never-enqueued") is None


async def test_results_expire_after_their_ttl(queue: WorkQueue) -> None:
    await queue.enqueue([new_item("i1")])
    await queue.complete([(await take_one(queue), b"ok")])
    assert await queue.get_result("i1") is not None
    await asyncio.sleep(CONFIG.result_ttl_ms / 1000 * 1.5)
    assert await queue.get_result("i1") is None


async def test_dequeue_waits_for_work_and_wakes_on_enqueue(queue: WorkQueue) -> None:
    waiting = asyncio.create_task(queue.dequeue("c1", count=5, lease_ms=LEASE_MS, wait_ms=5000))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    started = time.monotonic()
    await queue.enqueue([new_item("i1")])
    items = await asyncio.wait_for(waiting, 5)
    assert [i.item_id for i in items] == ["i1"]
    assert time.monotonic() - started < 1.0


async def test_dequeue_without_work_returns_empty_after_wait(queue: WorkQueue) -> None:
    started = time.monotonic()
    assert await queue.dequeue("c1", count=1, lease_ms=LEASE_MS, wait_ms=150) == []
    assert 0.1 < time.monotonic() - started < 2


async def test_stats_count_each_state(queue: WorkQueue) -> None:
    await queue.enqueue([new_item(f"i{n}") for n in range(4)])
    a, b, c = await take(queue, count=3)
    await queue.fail(a, "retry me")
    await queue.fail(b, "dead", retry=False)
    assert await queue.stats() == QueueStats(ready=1, leased=1, delayed=1, dead=1)
    await queue.complete([(c, b"ok")])
    assert await queue.stats() == QueueStats(ready=1, leased=0, delayed=1, dead=1)


async def test_an_item_released_with_a_delay_waits_then_comes_back_uncounted(
    queue: WorkQueue,
) -> None:
    await queue.enqueue([new_item("i1")])
    item = await take_one(queue)
    released_at = time.monotonic()

    assert await queue.release(item, delay_ms=200) is True

    assert await take(queue, "c2") == []
    assert await queue.stats() == QueueStats(ready=0, leased=0, delayed=1, dead=0)
    again = await take_one(queue, "c2", wait_ms=5_000)
    assert time.monotonic() - released_at >= 0.2 * 0.8
    assert (again.item_id, again.deliveries) == ("i1", 1)
    assert await queue.complete([(again, b"ok")]) == [True]


async def test_one_enqueue_across_streams_keeps_priority_and_tenant_turns(
    queue: WorkQueue,
) -> None:
    # One call readies each (priority, tenant) stream once: every item still lands in its own.
    added = await queue.enqueue(
        [
            new_item("a1", "ta"),
            new_item("a2", "ta"),
            new_item("b1", "tb"),
            new_item("h1", "tb", QueuePriority.HIGH),
            new_item("a1", "ta"),  # repeated in the same call: skipped
            new_item("l1", "ta", QueuePriority.LOW),
            new_item("a3", "ta"),
        ]
    )
    assert added == 6
    order = [item.item_id for item in await take(queue, count=10)]
    assert order[0] == "h1"
    assert order[-1] == "l1"
    normal = order[1:-1]
    assert sorted(normal) == ["a1", "a2", "a3", "b1"]
    assert normal.index("b1") <= 1  # tb's single item is served on the first or second turn
    assert [i for i in normal if i.startswith("a")] == ["a1", "a2", "a3"]


async def test_one_completion_call_across_streams_stores_each_result_once(
    queue: WorkQueue,
) -> None:
    # Deliveries of several (priority, tenant) streams, one of them twice, and one whose
    # item already finished, completed in one call: each item's first result is stored, every
    # delivery acknowledged, and the emptied streams take new work again.
    await queue.enqueue(
        [
            new_item("a1", "ta"),
            new_item("a2", "ta"),
            new_item("b1", "tb"),
            new_item("h1", "tb", QueuePriority.HIGH),
            new_item("done", "tc"),
        ]
    )
    items = {item.item_id: item for item in await take(queue, count=10)}
    assert await queue.complete([(items["done"], b"first")]) == [True]
    batch = [(items[i], f"r-{i}".encode()) for i in ("a1", "h1", "b1", "a2")]
    batch += [(items["a1"], b"again"), (items["done"], b"late")]
    assert await queue.complete(batch) == [True, True, True, True, False, False]
    for item_id, value in [("a1", b"r-a1"), ("a2", b"r-a2"), ("b1", b"r-b1"), ("done", b"first")]:
        result = await queue.get_result(item_id)
        assert result is not None
        assert result.value == value
    assert await queue.stats() == QueueStats(0, 0, 0, 0)
    assert await queue.enqueue([new_item("a4", "ta"), new_item("h2", "tb", QueuePriority.HIGH)])
    assert [item.item_id for item in await take(queue, count=10)] == ["h2", "a4"]


async def test_completing_some_deliveries_leaves_the_others_leased_and_ready(
    queue: WorkQueue,
) -> None:
    # Acknowledgement and deletion touch only the completed deliveries' entries.
    await queue.enqueue([new_item(f"i{n}") for n in range(6)])
    first = await take(queue, count=3)
    assert await queue.complete([(first[0], b"ok"), (first[2], b"ok")]) == [True, True]
    assert await queue.stats() == QueueStats(ready=3, leased=1, delayed=0, dead=0)
    rest = await take(queue, count=10)
    assert [item.item_id for item in rest] == ["i3", "i4", "i5"]
    assert await queue.complete([(first[1], b"ok"), *((i, b"ok") for i in rest)]) == [True] * 4
    assert await queue.stats() == QueueStats(0, 0, 0, 0)

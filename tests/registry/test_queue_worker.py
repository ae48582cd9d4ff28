"""domain.worker.QueueWorker over both queue backends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import cast

import pytest

from domain.errors import Unavailable
from domain.ports.queue import QueueStats, ResultStatus, WorkItem, WorkQueue
from domain.worker import Deferred, PermanentError, QueueWorker
from registry.memory_queue import MemoryWorkQueue
from tests.registry.queue_fixtures import CONFIG, LEASE_MS, new_item, open_queue

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def queue(backend_url: str | None) -> AsyncIterator[WorkQueue]:
    async with open_queue(backend_url) as opened:
        yield opened


@contextlib.asynccontextmanager
async def running(worker: QueueWorker) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)


def make_worker(
    queue: WorkQueue,
    handler: Callable[[WorkItem], Awaitable[bytes]],
    *,
    consumer: str = "w1",
    concurrency: int = 4,
    grace_s: float = 2.0,
    outage_retry_s: float = 0.01,
) -> QueueWorker:
    return QueueWorker(
        queue,
        handler,
        concurrency=concurrency,
        lease_s=LEASE_MS / 1000,
        consumer=consumer,
        poll_s=0.05,
        grace_s=grace_s,
        outage_retry_s=outage_retry_s,
    )


async def echo(item: WorkItem) -> bytes:
    return b"echo:" + item.payload


async def test_worker_processes_every_item_once(queue: WorkQueue) -> None:
    calls: Counter[str] = Counter()

    async def handler(item: WorkItem) -> bytes:
        calls[item.item_id] += 1
        await asyncio.sleep(0.001)
        return await echo(item)

    worker = make_worker(queue, handler, concurrency=8)
    async with running(worker):
        await queue.enqueue([new_item(f"i{n}") for n in range(100)])
        results = await asyncio.gather(*(queue.wait_result(f"i{n}", 10) for n in range(100)))
    assert [r.value if r else None for r in results] == [f"echo:i{n}".encode() for n in range(100)]
    assert set(calls.values()) == {1}
    assert worker.stats.completed == 100
    assert await queue.stats() == QueueStats(0, 0, 0, 0)


async def test_worker_renews_the_lease_of_a_long_item(queue: WorkQueue) -> None:
    calls: Counter[str] = Counter()
    started = asyncio.Event()

    async def slow(item: WorkItem) -> bytes:
        calls[item.item_id] += 1
        started.set()
        await asyncio.sleep(LEASE_MS / 1000 * 4)
        return b"slow"

    first = make_worker(queue, slow, consumer="w1")
    second = make_worker(queue, slow, consumer="w2")
    async with running(first):
        await queue.enqueue([new_item("long")])
        # w2 starts once w1 holds the item and keeps polling (and reclaiming) all along.
        await asyncio.wait_for(started.wait(), 5)
        async with running(second):
            result = await queue.wait_result("long", 10)
    assert result is not None
    assert (result.value, result.deliveries) == (b"slow", 1)
    assert calls == {"long": 1}
    assert first.stats.lost_leases == 0


async def test_failures_are_retried_then_dead_lettered(queue: WorkQueue) -> None:
    calls: Counter[str] = Counter()

    async def flaky(item: WorkItem) -> bytes:
        calls[item.item_id] += 1
        if item.item_id == "permanent":
            raise PermanentError("bad input")
        if item.item_id == "always" or item.deliveries < 2:
            raise RuntimeError(f"attempt {item.deliveries}")
        return b"ok"

    worker = make_worker(queue, flaky)
    async with running(worker):
        await queue.enqueue([new_item("flaky"), new_item("always"), new_item("permanent")])
        flaky_result, always, permanent = await asyncio.gather(
            *(queue.wait_result(i, 10) for i in ("flaky", "always", "permanent"))
        )
    assert flaky_result is not None
    assert (flaky_result.status, flaky_result.deliveries) == (ResultStatus.SUCCEEDED, 2)
    assert always is not None
    assert (always.status, always.error) == (ResultStatus.FAILED, "RuntimeError: attempt 3")
    assert permanent is not None
    assert (permanent.status, permanent.error) == (ResultStatus.FAILED, "PermanentError: bad input")
    assert calls == {"flaky": 2, "always": CONFIG.max_deliveries, "permanent": 1}
    assert sorted(d.item_id for d in await queue.list_dead()) == ["always", "permanent"]


async def test_each_failed_delivery_is_logged_with_what_became_of_the_item(
    queue: WorkQueue, caplog: pytest.LogCaptureFixture
) -> None:
    async def always_fails(item: WorkItem) -> bytes:
        raise RuntimeError(f"attempt {item.deliveries}")

    worker = make_worker(queue, always_fails)
    with caplog.at_level(logging.WARNING, logger="domain.worker"):
        async with running(worker):
            await queue.enqueue([new_item("doomed")])
            assert await queue.wait_result("doomed", 10) is not None
    said = [r.getMessage() for r in caplog.records if "doomed" in r.getMessage()]
    last = CONFIG.max_deliveries
    assert said == [
        *(
            f"work item doomed failed on delivery {n}: RuntimeError: attempt {n}; "
            "it runs again after a backoff"
            for n in range(1, last)
        ),
        f"work item doomed failed on delivery {last}: RuntimeError: attempt {last}; "
        "given up on: dead-lettered",
    ]


async def test_the_dead_letter_hook_hears_of_each_item_given_up_on(queue: WorkQueue) -> None:
    told: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    async def always_fails(item: WorkItem) -> bytes:
        raise RuntimeError(f"attempt {item.deliveries}")

    async def hook(item: WorkItem, error: str) -> None:
        told.put_nowait((item.item_id, error))

    worker = make_worker(queue, always_fails)
    worker.on_dead_letter = hook
    async with running(worker):
        await queue.enqueue([new_item("doomed")])
        heard = await asyncio.wait_for(told.get(), 10)
    assert heard == ("doomed", f"RuntimeError: attempt {CONFIG.max_deliveries}")
    assert told.empty()


async def test_stop_finishes_items_within_the_grace_period(queue: WorkQueue) -> None:
    started = asyncio.Event()

    async def short(item: WorkItem) -> bytes:
        started.set()
        await asyncio.sleep(0.1)
        return b"done"

    worker = make_worker(queue, short, grace_s=5)
    task = asyncio.create_task(worker.run())
    await queue.enqueue([new_item("i1")])
    await asyncio.wait_for(started.wait(), 5)
    worker.stop()
    await asyncio.wait_for(task, 5)
    result = await queue.get_result("i1")
    assert result is not None
    assert result.value == b"done"


async def test_stop_releases_items_past_the_grace_period(queue: WorkQueue) -> None:
    started = asyncio.Event()

    async def stuck(item: WorkItem) -> bytes:
        started.set()
        await asyncio.sleep(3600)
        return b"never"

    worker = make_worker(queue, stuck, grace_s=0.1)
    task = asyncio.create_task(worker.run())
    await queue.enqueue([new_item("i1")])
    await asyncio.wait_for(started.wait(), 5)
    worker.stop()
    await asyncio.wait_for(task, 5)
    assert worker.stats.released == 1
    # Ready again at once (no lease wait) and the aborted delivery is not counted.
    async with running(make_worker(queue, echo, consumer="w2")):
        result = await queue.wait_result("i1", 5)
    assert result is not None
    assert (result.value, result.deliveries) == (b"echo:i1", 1)


async def test_a_deferred_item_waits_in_the_queue_and_is_never_dead_lettered(
    queue: WorkQueue,
) -> None:
    deferrals = CONFIG.max_deliveries + 2  # more than the deliveries a failing item gets
    calls: Counter[str] = Counter()

    async def at_a_limit(item: WorkItem) -> bytes:
        calls[item.item_id] += 1
        if calls[item.item_id] <= deferrals:
            raise Deferred(20, "the tenant is at its limit")
        return b"ran"

    worker = make_worker(queue, at_a_limit)
    async with running(worker):
        await queue.enqueue([new_item("i1")])
        result = await queue.wait_result("i1", 10)
    assert result is not None
    assert (result.status, result.value, result.deliveries) == (ResultStatus.SUCCEEDED, b"ran", 1)
    assert calls["i1"] == deferrals + 1
    assert worker.stats.deferred == deferrals
    assert (worker.stats.retried, worker.stats.dead_lettered) == (0, 0)
    assert await queue.list_dead() == []


async def test_an_item_whose_handler_meets_outages_runs_after_them_never_dead_lettered(
    queue: WorkQueue,
) -> None:
    # A Redis failover or a platform service down: more outages in a row than the deliveries
    # a failing item gets, and the item still runs, its deliveries uncounted.
    outages = CONFIG.max_deliveries + 2
    calls: Counter[str] = Counter()

    async def during_an_outage(item: WorkItem) -> bytes:
        calls[item.item_id] += 1
        if calls[item.item_id] <= outages:
            raise Unavailable("redis unavailable: Error 111 connecting. Connection refused.")
        return b"ran"

    worker = make_worker(queue, during_an_outage)
    async with running(worker):
        await queue.enqueue([new_item("i1")])
        result = await queue.wait_result("i1", 10)
    assert result is not None
    assert (result.status, result.value, result.deliveries) == (ResultStatus.SUCCEEDED, b"ran", 1)
    assert calls["i1"] == outages + 1
    assert worker.stats.backed_off == outages
    assert (worker.stats.retried, worker.stats.dead_lettered) == (0, 0)
    assert await queue.list_dead() == []


class _GivenBackDelays(MemoryWorkQueue):
    """Records the delay of every delivery given back."""

    def __init__(self) -> None:
        super().__init__(CONFIG)
        self.delays_ms: list[int] = []

    async def release(self, item: WorkItem, *, delay_ms: int = 0) -> bool:
        self.delays_ms.append(delay_ms)
        return await super().release(item, delay_ms=delay_ms)


async def test_an_item_meeting_outages_in_a_row_waits_twice_as_long_each_time() -> None:
    queue = _GivenBackDelays()
    calls: Counter[str] = Counter()

    async def during_an_outage(item: WorkItem) -> bytes:
        calls[item.item_id] += 1
        if calls[item.item_id] <= 4:
            raise Unavailable("redis unavailable")
        return b"ran"

    async with running(make_worker(queue, during_an_outage, outage_retry_s=0.005)):
        await queue.enqueue([new_item("i1")])
        assert await queue.wait_result("i1", 10) is not None
    assert queue.delays_ms == [5, 10, 20, 40]


class _GatedCompletions(MemoryWorkQueue):
    """Completions wait for ``gate``; ``completing`` is set once one waits."""

    def __init__(self) -> None:
        super().__init__(CONFIG)
        self.gate = asyncio.Event()
        self.completing = asyncio.Event()

    async def complete(self, results: Sequence[tuple[WorkItem, bytes]]) -> list[bool]:
        self.completing.set()
        await self.gate.wait()
        return await super().complete(results)


async def test_a_slot_is_held_until_its_result_is_recorded() -> None:
    # The item's task ends when its handler returns; its slot (and its lease renewal) lasts
    # until the flusher has recorded the result.
    queue = _GatedCompletions()
    calls: list[str] = []

    async def handler(item: WorkItem) -> bytes:
        calls.append(item.item_id)
        return b"ok"

    worker = make_worker(queue, handler, concurrency=1)
    async with running(worker):
        await queue.enqueue([new_item("i1"), new_item("i2")])
        await asyncio.wait_for(queue.completing.wait(), 5)
        await asyncio.sleep(LEASE_MS / 1000)  # a lease renewal and several polls pass
        assert calls == ["i1"]
        assert await queue.stats() == QueueStats(ready=1, leased=1, delayed=0, dead=0)
        queue.gate.set()
        result = await queue.wait_result("i2", 5)
    assert result is not None
    assert calls == ["i1", "i2"]
    assert (worker.stats.completed, worker.stats.lost_leases) == (2, 0)


class _RenewalsHang(MemoryWorkQueue):
    """A renewal hangs, and its cancellation surfaces as Unavailable (as a Redis client cut
    off mid-command may report it)."""

    def __init__(self) -> None:
        super().__init__(CONFIG)
        self.renewing = asyncio.Event()

    async def renew(self, items: Sequence[WorkItem]) -> list[bool]:
        self.renewing.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise Unavailable("connection closed while renewing") from None
        raise AssertionError("unreachable")


async def test_the_worker_stops_when_a_renewal_swallows_its_cancellation() -> None:
    queue = _RenewalsHang()

    async def handler(item: WorkItem) -> bytes:
        await queue.renewing.wait()
        return b"ok"

    worker = make_worker(queue, handler)
    task = asyncio.create_task(worker.run())
    await queue.enqueue([new_item("i1")])
    result = await queue.wait_result("i1", 5)
    assert result is not None
    worker.stop()
    await asyncio.wait_for(task, 5)


class _CountedRenewals(MemoryWorkQueue):
    """Records the item ids of each renew call; answers False for the ``reclaimed`` ones (as
    when another consumer took them over); ``ticks`` is set once ``wanted`` calls came."""

    def __init__(self, wanted: int, reclaimed: frozenset[str] = frozenset()) -> None:
        super().__init__(CONFIG)
        self.calls: list[list[str]] = []
        self.wanted = wanted
        self.reclaimed = reclaimed
        self.ticks = asyncio.Event()

    async def renew(self, items: Sequence[WorkItem]) -> list[bool]:
        self.calls.append([item.item_id for item in items])
        if len(self.calls) >= self.wanted:
            self.ticks.set()
        held = await super().renew(items)
        taken = [item.item_id in self.reclaimed for item in items]
        return [h and not t for h, t in zip(held, taken, strict=True)]


async def test_the_worker_renews_every_inflight_lease_in_one_call_per_tick() -> None:
    queue = _CountedRenewals(wanted=2)
    await queue.enqueue([new_item(f"i{n}") for n in range(6)])

    async def handler(item: WorkItem) -> bytes:
        await queue.ticks.wait()
        return b"ok"

    worker = make_worker(queue, handler, concurrency=6)
    async with running(worker):
        await asyncio.wait_for(queue.ticks.wait(), 5)
        every = [f"i{n}" for n in range(6)]
        assert [sorted(call) for call in queue.calls[:2]] == [every, every]
    assert worker.stats.lost_leases == 0


async def test_a_lease_lost_among_held_ones_is_marked_lost_alone() -> None:
    queue = _CountedRenewals(wanted=2, reclaimed=frozenset({"i1"}))
    await queue.enqueue([new_item(f"i{n}") for n in range(3)])

    async def handler(item: WorkItem) -> bytes:
        await queue.ticks.wait()
        return b"ok"

    worker = make_worker(queue, handler, concurrency=3)
    async with running(worker):
        await asyncio.wait_for(queue.ticks.wait(), 5)
        # The lost one is renewed no more; the others still are.
        assert [sorted(call) for call in queue.calls[:2]] == [["i0", "i1", "i2"], ["i0", "i2"]]
    assert worker.stats.lost_leases == 1


async def test_a_tick_renews_many_leases_in_calls_of_bounded_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("domain.worker._RENEW_BATCH", 2)
    queue = _CountedRenewals(wanted=3)
    await queue.enqueue([new_item(f"i{n}") for n in range(5)])

    async def handler(item: WorkItem) -> bytes:
        await queue.ticks.wait()
        return b"ok"

    worker = make_worker(queue, handler, concurrency=5)
    async with running(worker):
        await asyncio.wait_for(queue.ticks.wait(), 5)
        first_tick = queue.calls[:3]
        assert [len(call) for call in first_tick] == [2, 2, 1]
        assert sorted(i for call in first_tick for i in call) == [f"i{n}" for n in range(5)]


class _RenewalsFailWhile:
    """``queue`` whose renewals fail (Unavailable, as through a Redis outage) while ``down``
    is set; ``redelivered`` is set once an item is leased a second time."""

    def __init__(self, queue: WorkQueue) -> None:
        self._queue = queue
        self.down = True
        self.redelivered = asyncio.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self._queue, name)

    async def renew(self, items: Sequence[WorkItem]) -> list[bool]:
        if self.down:
            raise Unavailable("redis unavailable: connection refused")
        return await self._queue.renew(items)

    async def dequeue(self, consumer: str, **kwargs: int) -> list[WorkItem]:
        items = await self._queue.dequeue(consumer, **kwargs)
        if any(item.deliveries > 1 for item in items):
            self.redelivered.set()
        return items


async def test_an_item_whose_lease_ran_out_under_its_running_handler_is_not_run_twice(
    queue: WorkQueue,
) -> None:
    """Renewals fail for longer than the lease while the handler runs; the worker leases the
    item again (its own, expired): the running handler takes the new delivery over, whose
    result is stored once renewals work again."""
    flaky = _RenewalsFailWhile(queue)
    calls: Counter[str] = Counter()
    finish = asyncio.Event()

    async def slow(item: WorkItem) -> bytes:
        calls[item.item_id] += 1
        await finish.wait()
        return b"done"

    worker = make_worker(cast(WorkQueue, flaky), slow)
    async with running(worker):
        await queue.enqueue([new_item("long")])
        await asyncio.wait_for(flaky.redelivered.wait(), 10)
        flaky.down = False
        finish.set()
        result = await queue.wait_result("long", 10)
    assert result is not None
    assert (result.status, result.value) == (ResultStatus.SUCCEEDED, b"done")
    # However often it came back (a slow machine may let a lease run out again), it ran once.
    assert result.deliveries >= 2
    assert calls == {"long": 1}
    assert (worker.stats.adopted, worker.stats.completed) == (result.deliveries - 1, 1)

"""The BatchStore contract: every backend must pass every test here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from domain.batch_models import BatchState, ItemOutcome, ItemRef, ItemStart, ItemState, NewBatch
from domain.ids import new_id
from domain.ports.batches import BatchStore
from domain.ports.queue import QueuePriority
from registry.backend import BackendConfig, open_backend

ERROR: dict[str, object] = {"code": "cancelled", "message": "stop", "retryable": False}


@pytest.fixture
async def store(backend_url: str | None) -> AsyncIterator[BatchStore]:
    registry = open_backend(
        BackendConfig(redis_url=backend_url, key_prefix="test", session_retention_ms=1000)
    )
    yield registry.batches
    await registry.aclose()


def new_batch(size: int, key: str = "", window_ms: int = 60_000) -> NewBatch:
    return NewBatch(
        batch_id=new_id(),
        priority=QueuePriority.LOW,
        idempotency_key=key,
        metadata={"m": "1"},
        window_ms=window_ms,
        custom_ids=[f"c{n}" for n in range(size)],
    )


def done(job: str = "j") -> ItemOutcome:
    return ItemOutcome(ItemState.COMPLETED, job, result={"text": "ok"}, usage={"total_tokens": 1})


async def test_create_is_idempotent_per_tenant_key(store: BatchStore) -> None:
    batch, created = await store.create_batch("t1", new_batch(3, key="k"))
    assert created and batch.state is BatchState.QUEUED
    assert (batch.counts.total, batch.counts.queued) == (3, 3)
    assert batch.priority is QueuePriority.LOW and dict(batch.metadata) == {"m": "1"}
    again, created_again = await store.create_batch("t1", new_batch(5, key="k"))
    assert not created_again and again.batch_id == batch.batch_id and again.counts.total == 3
    other, created_other = await store.create_batch("t2", new_batch(1, key="k"))
    assert created_other and other.batch_id != batch.batch_id
    found = await store.find_by_idempotency_key("t1", "k")
    assert found is not None and found.batch_id == batch.batch_id
    assert await store.get_batch("t2", batch.batch_id) is None


async def test_each_item_gets_exactly_one_result_and_counts_add_up(store: BatchStore) -> None:
    batch, _ = await store.create_batch("t1", new_batch(20))
    bid = batch.batch_id
    assert await store.start_item("t1", bid, 0, redelivery=False)
    assert not await store.start_item("t1", bid, 0, redelivery=False)
    assert await store.start_item("t1", bid, 0, redelivery=True)
    started = await store.get_batch("t1", bid)
    assert started is not None and started.state is BatchState.IN_PROGRESS
    assert (started.counts.queued, started.counts.running) == (19, 1)
    # Racing finishes of every item: one result each.
    outcomes = [done(), ItemOutcome(ItemState.FAILED, error={"code": "x"})]
    seqs = await asyncio.gather(
        *(store.finish_item("t1", bid, n, outcomes[k]) for n in range(20) for k in range(2))
    )
    assert sorted(s for s in seqs if s is not None) == list(range(1, 21))
    final = await store.get_batch("t1", bid)
    assert final is not None and final.state is BatchState.COMPLETED and final.finish_ms
    c = final.counts
    assert c.completed + c.failed == 20 and c.queued == c.running == 0
    results = await store.read_results("t1", bid, 0, limit=100, wait_s=0)
    assert [r.sequence for r in results] == list(range(1, 21))
    assert {r.custom_id for r in results} == {f"c{n}" for n in range(20)}
    tail = await store.read_results("t1", bid, 18, limit=100, wait_s=0)
    assert [r.sequence for r in tail] == [19, 20]


async def test_cancel_stops_queued_items_and_reports_running_jobs(store: BatchStore) -> None:
    batch, _ = await store.create_batch("t1", new_batch(4))
    bid = batch.batch_id
    assert await store.start_item("t1", bid, 1, redelivery=False)
    assert await store.attach_job("t1", bid, 1, "job-1", "sess-1")
    cancelling, running = await store.stop_batch("t1", bid, BatchState.CANCELLED, ERROR)
    assert cancelling is not None and cancelling.state is BatchState.CANCELLING
    assert [(r.index, r.job_id, r.session_id) for r in running] == [(1, "job-1", "sess-1")]
    assert cancelling.counts.cancelled == 3 and cancelling.counts.running == 1
    assert not await store.start_item("t1", bid, 0, redelivery=False)
    assert not await store.attach_job("t1", bid, 1, "job-1", "sess-1")  # cancel it
    seq = await store.finish_item("t1", bid, 1, ItemOutcome(ItemState.CANCELLED, "job-1"))
    assert seq == 4
    final = await store.get_batch("t1", bid)
    assert final is not None and final.state is BatchState.CANCELLED and final.counts.cancelled == 4
    results = await store.read_results("t1", bid, 0, limit=10, wait_s=0)
    assert {r.state for r in results} == {ItemState.CANCELLED}
    assert [r.job_id for r in results if r.custom_id == "c1"] == ["job-1"]
    unchanged, none_running = await store.stop_batch("t1", bid, BatchState.CANCELLED, ERROR)
    assert unchanged is not None and unchanged.state is BatchState.CANCELLED and not none_running


async def test_expiry_marks_every_unfinished_item(store: BatchStore) -> None:
    batch, _ = await store.create_batch("t1", new_batch(3, window_ms=1000))
    bid = batch.batch_id
    assert await store.start_item("t1", bid, 0, redelivery=False)
    await store.finish_item("t1", bid, 0, done())
    assert await store.start_item("t1", bid, 1, redelivery=False)
    expired, running = await store.stop_batch("t1", bid, BatchState.EXPIRED, ERROR)
    assert expired is not None and expired.state is BatchState.EXPIRED
    assert [r.index for r in running] == [1]
    assert (expired.counts.completed, expired.counts.expired, expired.counts.running) == (1, 2, 0)
    assert await store.finish_item("t1", bid, 1, done()) is None  # too late
    assert await store.stop_batch(
        "t1", "01890000-0000-7000-8000-000000000000", BatchState.EXPIRED, ERROR
    ) == (None, [])


async def test_a_reader_waits_for_the_next_result(store: BatchStore) -> None:
    batch, _ = await store.create_batch("t1", new_batch(1))
    bid = batch.batch_id
    reader = asyncio.create_task(store.read_results("t1", bid, 0, limit=10, wait_s=0.5))
    await asyncio.sleep(0)  # let the reader start waiting
    await store.start_item("t1", bid, 0, redelivery=False)
    await store.finish_item("t1", bid, 0, done())
    results = await asyncio.wait_for(reader, 5)
    assert [r.custom_id for r in results] == ["c0"]


async def test_batches_list_newest_first_per_tenant(store: BatchStore) -> None:
    ids = [(await store.create_batch("t1", new_batch(1)))[0].batch_id for _ in range(3)]
    await store.create_batch("t2", new_batch(1))
    page = await store.list_batches("t1", limit=2, after=None, state=None)
    assert [b.batch_id for b in page.items] == ids[::-1][:2] and page.next_cursor == ids[1]
    rest = await store.list_batches("t1", limit=2, after=page.next_cursor, state=None)
    assert [b.batch_id for b in rest.items] == ids[:1]
    done_only = await store.list_batches("t1", limit=10, after=None, state=BatchState.COMPLETED)
    assert done_only.items == []


@pytest.fixture
async def short_retention_store(backend_url: str | None) -> AsyncIterator[BatchStore]:
    registry = open_backend(
        BackendConfig(
            redis_url=backend_url,
            key_prefix="test-retention",
            session_retention_ms=1000,
            batch_retention_ms=200,
        )
    )
    yield registry.batches
    await registry.aclose()


async def _until_gone(store: BatchStore, tenant_id: str, batch_id: str) -> None:
    """Poll until the batch is dropped (time must pass; there is no event); bounded."""
    for _ in range(200):
        if await store.get_batch(tenant_id, batch_id) is None:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"batch {batch_id} was kept past its retention")


async def test_a_final_batch_is_dropped_after_its_retention_with_its_idempotency_key(
    short_retention_store: BatchStore,
) -> None:
    store = short_retention_store
    batch, _ = await store.create_batch("t1", new_batch(1, key="nightly"))
    await store.finish_item("t1", batch.batch_id, 0, done())
    await _until_gone(store, "t1", batch.batch_id)
    assert await store.find_by_idempotency_key("t1", "nightly") is None
    page = await store.list_batches("t1", limit=10, after=None, state=None)
    assert page.items == []
    again, created = await store.create_batch("t1", new_batch(1, key="nightly"))
    assert created and again.batch_id != batch.batch_id


async def test_an_unfinished_batch_is_kept_past_the_retention(
    short_retention_store: BatchStore,
) -> None:
    store = short_retention_store
    batch, _ = await store.create_batch("t1", new_batch(2, window_ms=60_000))
    await store.finish_item("t1", batch.batch_id, 0, done())
    finished, _ = await store.create_batch("t1", new_batch(1))
    await store.finish_item("t1", finished.batch_id, 0, done())
    await _until_gone(store, "t1", finished.batch_id)
    kept = await store.get_batch("t1", batch.batch_id)
    assert kept is not None and kept.counts.completed == 1


# Re-opening an item for a redrive of its dead letter ------------------------------------------

DEAD: dict[str, object] = {"code": "dead_lettered", "message": "gave up", "retryable": True}


def dead() -> ItemOutcome:
    return ItemOutcome(ItemState.FAILED, error=DEAD)


async def test_a_reopened_failed_item_leaves_the_results_and_its_completed_batch_runs_again(
    store: BatchStore,
) -> None:
    batch, _ = await store.create_batch("t1", new_batch(3))
    bid = batch.batch_id
    for index, outcome in ((0, done()), (1, dead()), (2, done())):
        await store.finish_item("t1", bid, index, outcome)
    assert await store.reopen_item("t1", bid, 1) == (BatchState.IN_PROGRESS, ItemState.QUEUED)
    reopened = await store.get_batch("t1", bid)
    assert reopened is not None and reopened.state is BatchState.IN_PROGRESS
    assert reopened.finish_ms == 0
    c = reopened.counts
    assert (c.queued, c.running, c.completed, c.failed) == (1, 0, 2, 0)
    results = await store.read_results("t1", bid, 0, limit=100, wait_s=0)
    assert [(r.sequence, r.custom_id) for r in results] == [(1, "c0"), (3, "c2")]
    assert await store.start_item("t1", bid, 1, redelivery=False)
    assert await store.finish_item("t1", bid, 1, done()) == 4
    final = await store.get_batch("t1", bid)
    assert final is not None and final.state is BatchState.COMPLETED and final.finish_ms
    assert (final.counts.completed, final.counts.failed) == (3, 0)
    results = await store.read_results("t1", bid, 0, limit=100, wait_s=0)
    assert [(r.sequence, r.custom_id, r.state) for r in results] == [
        (1, "c0", ItemState.COMPLETED),
        (3, "c2", ItemState.COMPLETED),
        (4, "c1", ItemState.COMPLETED),
    ]
    assert [r.sequence for r in await store.read_results("t1", bid, 3, limit=9, wait_s=0)] == [4]


async def test_an_item_left_running_by_dead_deliveries_is_reopened_queued(
    store: BatchStore,
) -> None:
    batch, _ = await store.create_batch("t1", new_batch(2))
    bid = batch.batch_id
    assert await store.start_item("t1", bid, 0, redelivery=False)
    assert await store.reopen_item("t1", bid, 0) == (BatchState.IN_PROGRESS, ItemState.QUEUED)
    reopened = await store.get_batch("t1", bid)
    assert reopened is not None
    assert (reopened.counts.queued, reopened.counts.running) == (2, 0)
    assert await store.start_item("t1", bid, 0, redelivery=False)


async def test_items_of_stopped_batches_and_ended_items_are_not_reopened(
    store: BatchStore,
) -> None:
    stopped = []
    for state in (BatchState.CANCELLED, BatchState.EXPIRED):
        batch, _ = await store.create_batch("t1", new_batch(2))
        await store.finish_item("t1", batch.batch_id, 0, dead())
        await store.stop_batch("t1", batch.batch_id, state, ERROR)
        assert await store.reopen_item("t1", batch.batch_id, 0) == (state, ItemState.FAILED)
        stopped.append(batch.batch_id)
    for bid in stopped:
        after = await store.get_batch("t1", bid)
        assert after is not None and (after.counts.failed, after.counts.queued) == (1, 0)
        assert len(await store.read_results("t1", bid, 0, limit=9, wait_s=0)) == 2
    batch, _ = await store.create_batch("t1", new_batch(2))
    await store.finish_item("t1", batch.batch_id, 0, done())
    assert await store.reopen_item("t1", batch.batch_id, 0) == (
        BatchState.QUEUED,
        ItemState.COMPLETED,
    )
    assert await store.reopen_item("t1", batch.batch_id, 1) == (
        BatchState.QUEUED,
        ItemState.QUEUED,
    )
    assert await store.reopen_item("t1", batch.batch_id, 2) == (BatchState.QUEUED, None)
    assert await store.reopen_item("t2", batch.batch_id, 0) == (None, None)


async def test_an_item_is_not_reopened_past_its_batchs_window(store: BatchStore) -> None:
    batch, _ = await store.create_batch("t1", new_batch(2, window_ms=50))
    await store.finish_item("t1", batch.batch_id, 0, dead())
    for _ in range(100):  # time must pass (there is no event); bounded
        if ("t1", batch.batch_id) in await store.due_for_expiry(limit=1000):
            break
        await asyncio.sleep(0.02)
    assert await store.reopen_item("t1", batch.batch_id, 0) == (
        BatchState.QUEUED,
        ItemState.FAILED,
    )


async def test_a_reopened_batch_is_kept_past_the_retention_again(
    short_retention_store: BatchStore,
) -> None:
    store = short_retention_store
    batch, _ = await store.create_batch("t1", new_batch(1, window_ms=60_000))
    await store.finish_item("t1", batch.batch_id, 0, dead())
    assert await store.reopen_item("t1", batch.batch_id, 0) == (
        BatchState.IN_PROGRESS,
        ItemState.QUEUED,
    )
    finished, _ = await store.create_batch("t1", new_batch(1))
    await store.finish_item("t1", finished.batch_id, 0, done())
    await _until_gone(store, "t1", finished.batch_id)
    kept = await store.get_batch("t1", batch.batch_id)
    assert kept is not None and kept.counts.queued == 1


async def test_several_items_in_one_call_answer_as_one_by_one(store: BatchStore) -> None:
    first, _ = await store.create_batch("t1", new_batch(3))
    other, _ = await store.create_batch("t2", new_batch(1))
    a, b = first.batch_id, other.batch_id
    refs = [ItemRef("t1", a, 0), ItemRef("t1", a, 1), ItemRef("t2", b, 0), ItemRef("t1", a, 9)]
    assert await store.start_items(refs) == [
        ItemStart.STARTED,
        ItemStart.STARTED,
        ItemStart.STARTED,
        ItemStart.REFUSED,  # no such item
    ]
    # Left RUNNING by a delivery that did not finish: it runs again.
    assert await store.start_items(refs[:1]) == [ItemStart.RESUMED]
    assert not ItemStart.REFUSED and ItemStart.STARTED and ItemStart.RESUMED
    attached = await store.attach_jobs([(refs[0], "j0", "s"), (refs[2], "j2", "s")])
    assert attached == [True, True]
    seqs = await store.finish_items([(refs[0], done("j0")), (refs[2], done("j2"))])
    assert seqs == [1, 1]
    assert await store.finish_items([(refs[0], done("j0"))]) == [None]  # finished already
    batch = await store.get_batch("t1", a)
    assert batch is not None and (batch.counts.running, batch.counts.completed) == (1, 1)
    assert await store.start_items([ItemRef("t1", a, 2)]) == [ItemStart.STARTED]
    await store.stop_batch("t1", a, BatchState.CANCELLED, ERROR)
    assert await store.attach_jobs([(refs[1], "j1", "s")]) == [False]  # cancelling


async def test_every_unfinished_batch_is_on_the_expiry_schedule(store: BatchStore) -> None:
    first, _ = await store.create_batch("t1", new_batch(1))
    second, _ = await store.create_batch("t2", new_batch(2))

    scheduled = await store.scheduled_batches(limit=100)

    assert {("t1", first.batch_id), ("t2", second.batch_id)} <= set(scheduled)
    assert len(await store.scheduled_batches(limit=1)) == 1


async def test_running_items_are_the_started_unfinished_ones(store: BatchStore) -> None:
    batch, _ = await store.create_batch("t1", new_batch(4))
    bid = batch.batch_id
    for index in (0, 2, 3):
        assert await store.start_item("t1", bid, index, redelivery=False)
    assert await store.finish_item("t1", bid, 3, done())

    assert await store.running_items("t1", bid) == [0, 2]
    assert await store.running_items("t2", bid) == []
    assert await store.running_items("t1", new_id()) == []

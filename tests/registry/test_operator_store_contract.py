"""The store reads behind the operator RPCs, on both backends: the per-tenant job index
(newest first, cursor paging, time range, trimming), per-tenant unfinished counts, and the work
queue's dead-letter inspection and depth by tenant and priority through every move an item
makes (lease, retry, dead letter, redrive, completion)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from domain.jobs import JobLimits
from domain.ports.queue import PriorityDepth, QueuePriority, WorkItem, WorkQueue
from registry.backend import Backend, BackendConfig, open_backend
from tests.registry.queue_fixtures import LEASE_MS, new_item, open_queue
from tests.registry.test_job_counts_contract import PREFIX, counts, start

HIGH, NORMAL, LOW = QueuePriority.HIGH, QueuePriority.NORMAL, QueuePriority.LOW


@pytest.fixture
async def registry(backend_url: str | None) -> AsyncIterator[Backend]:
    opened = open_backend(
        BackendConfig(redis_url=backend_url, key_prefix=PREFIX, session_retention_ms=60_000)
    )
    yield opened
    await opened.aclose()


@pytest.fixture
async def queue(backend_url: str | None) -> AsyncIterator[WorkQueue]:
    async with open_queue(backend_url) as opened:
        yield opened


# The job index --------------------------------------------------------------------------------


async def test_the_job_index_lists_a_tenants_jobs_newest_first(registry: Backend) -> None:
    made = [(await start(registry)).job for _ in range(4)]
    await start(registry, tenant="globex")
    listed = await registry.jobs.list_tenant_jobs(
        "acme", before=None, created_from_ms=None, created_to_ms=None, limit=10
    )
    assert [job_id for _, job_id in listed] == [
        job.job_id for job in sorted(made, key=lambda j: (j.created_at_ms, j.job_id), reverse=True)
    ]
    assert [created for created, _ in listed] == sorted(
        (job.created_at_ms for job in made), reverse=True
    )


async def test_paging_the_job_index_by_cursor_visits_every_job_once(registry: Backend) -> None:
    made = {(await start(registry)).job.job_id for _ in range(12)}
    everything = await registry.jobs.list_tenant_jobs(
        "acme", before=None, created_from_ms=None, created_to_ms=None, limit=100
    )
    seen: list[tuple[int, str]] = []
    cursor = None
    while page := await registry.jobs.list_tenant_jobs(
        "acme", before=cursor, created_from_ms=None, created_to_ms=None, limit=1
    ):
        seen += page
        cursor = page[-1]
    assert seen == everything
    assert {job_id for _, job_id in seen} == made


async def test_the_job_index_keeps_to_the_create_time_range(registry: Backend) -> None:
    jobs = []
    for _ in range(6):
        jobs.append((await start(registry)).job)
        await asyncio.sleep(0.002)  # distinct create times (nothing to await: only time)
    times = sorted({job.created_at_ms for job in jobs})
    assert len(times) >= 3
    low, high = times[1], times[-1]
    listed = await registry.jobs.list_tenant_jobs(
        "acme", before=None, created_from_ms=low, created_to_ms=high, limit=100
    )
    expected = sorted(
        ((j.created_at_ms, j.job_id) for j in jobs if low <= j.created_at_ms < high),
        reverse=True,
    )
    assert listed == expected


async def test_get_jobs_reads_several_and_none_for_unknown_or_foreign_ids(
    registry: Backend,
) -> None:
    mine = (await start(registry)).job
    theirs = (await start(registry, tenant="globex")).job
    found = await registry.jobs.get_jobs("acme", [mine.job_id, theirs.job_id, "missing"])
    assert [job.job_id if job else None for job in found] == [mine.job_id, None, None]


async def test_unfinished_counts_of_one_tenant_leave_the_others_out(registry: Backend) -> None:
    await start(registry)
    await start(registry, tenant="globex")
    await start(registry, tenant="globex")
    assert await registry.jobs.count_unfinished_of("acme") == counts(pending=1)
    assert await registry.jobs.count_unfinished_of("globex") == counts(pending=2)
    assert await registry.jobs.count_unfinished_of("initech") == counts()


async def test_tenants_that_started_jobs_today_are_known(registry: Backend) -> None:
    started = await start(registry)
    await start(registry, tenant="globex")
    since = started.job.created_at_ms - 1
    assert await registry.jobs.tenants_started_since(since) >= {"acme", "globex"}


async def test_a_start_trims_index_entries_older_than_any_job_is_kept(
    registry: Backend,
) -> None:
    brief = JobLimits(deadline_ms=100, heartbeat_ms=100, retention_ms=50, queue_timeout_ms=50)
    gone = (await start(registry, limits=brief)).job
    kept_ms = brief.queue_timeout_ms + brief.deadline_ms + brief.retention_ms
    await asyncio.sleep((kept_ms + 50) / 1000)  # no event: the entry only grows old
    fresh = (await start(registry, limits=brief)).job
    listed = await registry.jobs.list_tenant_jobs(
        "acme", before=None, created_from_ms=None, created_to_ms=None, limit=5
    )
    assert [job_id for _, job_id in listed] == [fresh.job_id]
    assert gone.job_id != fresh.job_id


# The work queue -------------------------------------------------------------------------------


def depth(found: list[PriorityDepth]) -> dict[QueuePriority, tuple[int, int, int, int]]:
    return {d.priority: (d.ready, d.leased, d.delayed, d.dead) for d in found}


ZERO = (0, 0, 0, 0)


async def test_an_empty_queue_has_zero_depth_at_every_priority(queue: WorkQueue) -> None:
    assert depth(await queue.depth()) == {HIGH: ZERO, NORMAL: ZERO, LOW: ZERO}
    assert [d.priority for d in await queue.depth("t1")] == [HIGH, NORMAL, LOW]


async def test_depth_follows_items_through_lease_retry_dead_letter_and_redrive(
    queue: WorkQueue,
) -> None:
    await queue.enqueue(
        [
            new_item("a", "t1", NORMAL),
            new_item("b", "t1", NORMAL),
            new_item("c", "t1", NORMAL),
            new_item("h", "t2", HIGH),
        ]
    )
    assert depth(await queue.depth("t1"))[NORMAL] == (3, 0, 0, 0)
    assert depth(await queue.depth("t2")) == {HIGH: (1, 0, 0, 0), NORMAL: ZERO, LOW: ZERO}
    (h,) = await queue.dequeue("c1", count=1, lease_ms=LEASE_MS)
    assert h.item_id == "h"
    assert depth(await queue.depth("t2"))[HIGH] == (0, 1, 0, 0)
    first, second = await queue.dequeue("c1", count=2, lease_ms=LEASE_MS)
    await queue.fail(first, "boom")  # retried after a backoff
    await queue.fail(second, "fatal", retry=False)  # dead now
    assert depth(await queue.depth("t1"))[NORMAL] == (1, 0, 1, 1)
    assert depth(await queue.depth())[NORMAL] == (1, 0, 1, 1)
    assert depth(await queue.depth())[HIGH] == (0, 1, 0, 0)
    assert depth(await queue.depth("t3")) == {HIGH: ZERO, NORMAL: ZERO, LOW: ZERO}
    assert await queue.redrive(second.item_id)
    assert depth(await queue.depth("t1"))[NORMAL] == (2, 0, 1, 0)
    # The retry becomes ready once its backoff is over, and leaves the delayed count.
    retried: list[WorkItem] = []
    while len(retried) < 3:
        retried += await queue.dequeue("c1", count=3, lease_ms=LEASE_MS, wait_ms=1000)
    assert depth(await queue.depth("t1"))[NORMAL] == (0, 3, 0, 0)
    await queue.complete([(item, b"ok") for item in retried])
    assert depth(await queue.depth("t1"))[NORMAL] == ZERO


async def test_a_dead_letter_is_read_with_its_payload(queue: WorkQueue) -> None:
    await queue.enqueue([new_item("d", "t1", LOW, payload=b"\x00body", batch_id="b1")])
    assert await queue.get_dead("d") is None
    (item,) = await queue.dequeue("c1", count=1, lease_ms=LEASE_MS)
    await queue.fail(item, "bad input", retry=False)
    letter = await queue.get_dead("d")
    assert letter is not None
    assert (letter.item_id, letter.tenant_id, letter.priority, letter.batch_id) == (
        "d",
        "t1",
        LOW,
        "b1",
    )
    assert (letter.payload, letter.error, letter.deliveries) == (b"\x00body", "bad input", 1)
    assert [d.position for d in await queue.list_dead()] == [letter.position]
    assert await queue.redrive("d")
    assert await queue.get_dead("d") is None
    assert await queue.get_dead("never-queued") is None

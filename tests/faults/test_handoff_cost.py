"""The per-process upkeep of hand-offs (domain.handoff_upkeep) keeps every guarantee of the
durable hand-off at a lower cost per chat: a hand-off runs in its own task alone (one loop
renews the leases of all slow ones), the confirmations of hand-offs finishing together are
written in one call, also at shutdown, and none is written for a hand-off whose first notice
(which confirms it in its own script) was applied before its confirmation was due."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from domain.handoff_upkeep import HandoffConfirmations, HandoffLeases
from domain.ids import new_id
from domain.jobs import HandoffClaim, IfBusy, JobLimits, NewJob, StartedJob
from domain.models import Service, WorkKind
from registry.backend import Backend
from tests.support.registries import new_session, opened_registry

GRACE_MS = 300
LIMITS = JobLimits(
    deadline_ms=60_000,
    heartbeat_ms=30_000,
    retention_ms=60_000,
    queue_timeout_ms=600_000,
    handoff_grace_ms=GRACE_MS,
    handoff_attempts=3,
)
TENANT = "acme"
WAIT_S = 10.0


class CountingJobs:
    """The real job store, counting the confirmation calls it gets."""

    def __init__(self, jobs: Any) -> None:
        self._jobs = jobs
        self.confirm_calls: list[list[tuple[str, str]]] = []
        self.confirmed = asyncio.Event()  # set once a confirmation call returned

    async def handoffs_done(self, done: Sequence[tuple[str, str]]) -> None:
        self.confirm_calls.append(list(done))
        await self._jobs.handoffs_done(done)
        self.confirmed.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._jobs, name)


@pytest.fixture
async def registry(backend_url: str | None) -> AsyncIterator[Backend]:
    async with opened_registry(backend_url) as opened:
        yield opened


async def start(registry: Backend) -> str:
    session_id = await new_session(registry)
    new = NewJob(new_id(), session_id, "agent-1", Service.QUERY, WorkKind.LLM_QUERY, "hi", "r")
    started = await registry.jobs.start_job(TENANT, new, LIMITS, if_busy=IfBusy.RUN)
    assert isinstance(started, StartedJob)
    return new.job_id


async def claims_after_the_grace(registry: Backend) -> list[HandoffClaim]:
    await asyncio.sleep(GRACE_MS / 1000 + 0.05)
    return await registry.jobs.claim_handoffs(LIMITS, limit=100)


async def test_hand_offs_finishing_together_are_confirmed_in_one_call(registry: Backend) -> None:
    jobs = CountingJobs(registry.jobs)
    confirmations = HandoffConfirmations(jobs)
    job_ids = [await start(registry) for _ in range(5)]

    for job_id in job_ids:
        confirmations.add(TENANT, job_id)
    await confirmations.flush()

    assert jobs.confirm_calls == [[(TENANT, job_id) for job_id in job_ids]]
    assert await claims_after_the_grace(registry) == []


async def test_confirmations_added_while_one_is_written_go_in_the_next_call(
    registry: Backend,
) -> None:
    jobs = CountingJobs(registry.jobs)
    confirmations = HandoffConfirmations(jobs)
    first, second, third = [await start(registry) for _ in range(3)]

    confirmations.add(TENANT, first)
    await asyncio.sleep(0)  # the writer took the first batch
    await asyncio.sleep(0)
    confirmations.add(TENANT, second)
    confirmations.add(TENANT, third)
    await confirmations.flush()

    assert jobs.confirm_calls == [[(TENANT, first)], [(TENANT, second), (TENANT, third)]]
    assert confirmations.pending == 0
    assert await claims_after_the_grace(registry) == []


async def test_a_hand_off_whose_first_notice_came_first_writes_no_confirmation(
    registry: Backend,
) -> None:
    jobs = CountingJobs(registry.jobs)
    confirmations = HandoffConfirmations(jobs)
    job_id = await start(registry)

    confirmations.begin(job_id)
    confirmations.notice_applied(job_id)  # while the submit goes on
    confirmations.add(TENANT, job_id)
    await confirmations.flush()

    assert jobs.confirm_calls == []
    assert confirmations.skipped == 1


async def test_a_confirmation_waits_its_delay_and_a_notice_meanwhile_drops_it(
    registry: Backend,
) -> None:
    jobs = CountingJobs(registry.jobs)
    confirmations = HandoffConfirmations(jobs, delay_s=GRACE_MS / 6000)
    noticed, silent = await start(registry), await start(registry)
    for job_id in (noticed, silent):
        confirmations.begin(job_id)
        confirmations.add(TENANT, job_id)

    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert jobs.confirm_calls == []  # not yet due
    confirmations.notice_applied(noticed)
    # Written once due, by the writer (no flush).
    await asyncio.wait_for(jobs.confirmed.wait(), WAIT_S)

    assert jobs.confirm_calls == [[(TENANT, silent)]]
    assert confirmations.skipped == 1


async def test_a_flush_writes_the_confirmations_not_yet_due_at_once(registry: Backend) -> None:
    jobs = CountingJobs(registry.jobs)
    confirmations = HandoffConfirmations(jobs, delay_s=60.0)
    job_id = await start(registry)
    confirmations.begin(job_id)
    confirmations.add(TENANT, job_id)

    await asyncio.wait_for(confirmations.flush(), WAIT_S)

    assert jobs.confirm_calls == [[(TENANT, job_id)]]
    assert await claims_after_the_grace(registry) == []


async def test_work_slower_than_the_grace_keeps_its_lease(registry: Backend) -> None:
    leases = HandoffLeases(registry.jobs, LIMITS)
    job_id = await start(registry)
    claimed: list[HandoffClaim] = []

    done = asyncio.Event()

    async def claimer() -> None:
        # Ends on ``done`` (not by cancellation), and the test waits for it: nothing of the
        # test is left running in the event loop, whatever the assertions below find.
        while not done.is_set():
            claimed.extend(await registry.jobs.claim_handoffs(LIMITS, limit=10))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.02)

    watching = asyncio.create_task(claimer())
    began = time.monotonic()
    try:
        await leases.holding(TENANT, job_id, asyncio.sleep(GRACE_MS / 1000 * 3))
    finally:
        done.set()
        await asyncio.wait_for(watching, WAIT_S)
    # uvloop keeps its timers in whole milliseconds: a sleep may end up to 1 ms early.
    assert time.monotonic() - began >= GRACE_MS / 1000 * 3 - 0.001
    assert claimed == []
    assert leases.renewals >= 2
    # Once the work is over, nobody renews it: the lease runs out (the caller confirms it).
    assert [c.job.job_id for c in await claims_after_the_grace(registry)] == [job_id]
    await leases.aclose()


async def test_one_loop_renews_every_hand_off_in_progress(registry: Backend) -> None:
    leases = HandoffLeases(registry.jobs, LIMITS)
    job_ids = [await start(registry) for _ in range(5)]
    release = asyncio.Event()
    before = len(asyncio.all_tasks())

    holders = [
        asyncio.create_task(leases.holding(TENANT, job_id, release.wait())) for job_id in job_ids
    ]
    await asyncio.sleep(GRACE_MS / 1000 * 2)
    tasks_while_held = len(asyncio.all_tasks()) - before
    claims = await registry.jobs.claim_handoffs(LIMITS, limit=10)
    release.set()
    await asyncio.gather(*holders)

    assert tasks_while_held == len(job_ids) + 1  # the holders and one renewal loop
    assert claims == []
    assert leases.renewals >= 2 * len(job_ids)
    await leases.aclose()

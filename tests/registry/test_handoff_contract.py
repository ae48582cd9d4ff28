"""The JobStore's hand-off record on both backends: a started job keeps its work spec and a
hand-off lease until it is handed over; a PENDING job whose lease ran out without confirmation
is claimed by exactly one claimer, with everything needed to hand it over again, and after the
last attempt (or past its deadline) the claim fails the job itself. A QUEUED job's first
hand-off is its enqueue on the work queue: claimed alike (to be enqueued again) until the
enqueue is confirmed or the job is activated."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from domain.ids import new_id
from domain.jobs import (
    ActivateOutcome,
    EventDraft,
    EventKind,
    HandoffClaim,
    IfBusy,
    JobLimits,
    JobState,
    NewJob,
    Notice,
    NoticeEvent,
    StartedJob,
    Verdict,
)
from domain.models import Service, WorkKind
from domain.ports.queue import QueuePriority
from registry.backend import Backend
from tests.support.registries import new_session

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


def rag_job(session_id: str) -> NewJob:
    return NewJob(
        job_id=new_id(),
        session_id=session_id,
        agent_id="agent-1",
        service=Service.QUERY,
        kind=WorkKind.RAG_QUERY,
        content="What is the refund policy?",
        request_id="req-1",
        model="m-large",
        cache_key="",
        collections=("docs", "faq"),
    )


async def start(
    registry: Backend,
    new: NewJob | None = None,
    *,
    limits: JobLimits = LIMITS,
    if_busy: IfBusy = IfBusy.RUN,
    hold: bool = False,
) -> StartedJob:
    new = new or rag_job(await new_session(registry))
    started = await registry.jobs.start_job(TENANT, new, limits, if_busy=if_busy, hold=hold)
    assert isinstance(started, StartedJob)
    return started


async def claims_within(
    registry: Backend, seconds: float, limits: JobLimits = LIMITS
) -> list[HandoffClaim]:
    """Claim until something is claimed or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while True:
        claims = await registry.jobs.claim_handoffs(limits, limit=10)
        if claims or time.monotonic() >= deadline:
            return claims
        await asyncio.sleep(0.02)


async def test_a_started_job_is_not_claimed_while_its_hand_off_lease_holds(
    registry: Backend,
) -> None:
    await start(registry)
    assert await registry.jobs.claim_handoffs(LIMITS, limit=10) == []


async def test_an_unconfirmed_hand_off_is_claimed_after_its_lease_with_the_whole_work_spec(
    registry: Backend,
) -> None:
    new = rag_job(await new_session(registry))
    started = await start(registry, new)
    began = time.monotonic()
    (claim,) = await claims_within(registry, 3.0)
    assert time.monotonic() - began >= GRACE_MS / 1000 * 0.8
    # With the job's deadline, which bounds a plan's retries.
    assert claim == HandoffClaim(TENANT, new, attempt=2, deadline_ms=started.job.deadline_ms)


async def test_a_claim_holds_a_new_lease_so_nobody_else_claims_it_meanwhile(
    registry: Backend,
) -> None:
    await start(registry)
    (claim,) = await claims_within(registry, 3.0)
    assert await registry.jobs.claim_handoffs(LIMITS, limit=10) == []
    (again,) = await claims_within(registry, 3.0)
    assert (claim.attempt, again.attempt) == (2, 3)


async def test_concurrent_claimers_get_each_job_once(registry: Backend) -> None:
    jobs = {(await start(registry)).job.job_id for _ in range(5)}
    await asyncio.sleep(GRACE_MS / 1000 + 0.05)  # every lease has run out
    rounds = await asyncio.gather(
        *(registry.jobs.claim_handoffs(LIMITS, limit=10) for _ in range(4))
    )
    claimed = [c.job.job_id for claims in rounds for c in claims]
    assert sorted(claimed) == sorted(jobs)


async def test_a_confirmed_hand_off_is_never_claimed(registry: Backend) -> None:
    started = await start(registry)
    await registry.jobs.handoff_done(TENANT, started.job.job_id)
    assert await claims_within(registry, GRACE_MS / 1000 * 2) == []


async def test_several_hand_offs_are_confirmed_at_once(registry: Backend) -> None:
    confirmed = [(await start(registry)).job.job_id for _ in range(3)]
    unconfirmed = (await start(registry)).job.job_id
    await registry.jobs.handoffs_done([(TENANT, job_id) for job_id in confirmed])
    await asyncio.sleep(GRACE_MS / 1000 + 0.05)  # every lease has run out
    claims = await registry.jobs.claim_handoffs(LIMITS, limit=10)
    assert [c.job.job_id for c in claims] == [unconfirmed]


async def test_confirming_at_once_skips_unknown_jobs_and_other_tenants(registry: Backend) -> None:
    mine, theirs = (await start(registry)).job.job_id, (await start(registry)).job.job_id
    await registry.jobs.handoffs_done([(TENANT, mine), ("other", theirs), (TENANT, new_id())])
    await asyncio.sleep(GRACE_MS / 1000 + 0.05)  # every lease has run out
    claims = await registry.jobs.claim_handoffs(LIMITS, limit=10)
    assert [c.job.job_id for c in claims] == [theirs]


async def test_confirming_nothing_at_once_changes_nothing(registry: Backend) -> None:
    started = await start(registry)
    await registry.jobs.handoffs_done([])
    (claim,) = await claims_within(registry, 3.0)
    assert claim.job.job_id == started.job.job_id


async def test_the_services_first_notice_confirms_the_hand_off(registry: Backend) -> None:
    started = await start(registry)
    notice = Notice(
        NoticeEvent.PROGRESS, Service.QUERY, started.job.job_id, TENANT, 1, "agent-1", {}
    )
    await registry.jobs.apply_notice(notice, LIMITS)
    assert await claims_within(registry, GRACE_MS / 1000 * 2) == []


async def test_a_finished_job_is_never_claimed(registry: Backend) -> None:
    started = await start(registry)
    draft = EventDraft(started.job.job_id, EventKind.CANCELLED, "req-1", {"reason": "test"})
    await registry.jobs.finish_job(TENANT, started.job.job_id, draft, LIMITS)
    assert await claims_within(registry, GRACE_MS / 1000 * 2) == []


async def test_a_renewed_lease_is_not_claimed_until_it_runs_out(registry: Backend) -> None:
    started = await start(registry)
    job_id = started.job.job_id
    began = time.monotonic()
    for _ in range(4):  # renew at half the grace, for twice the grace
        await asyncio.sleep(GRACE_MS / 2000)
        assert await registry.jobs.renew_handoff(TENANT, job_id, LIMITS)
        assert await registry.jobs.claim_handoffs(LIMITS, limit=10) == []
    (claim,) = await claims_within(registry, 3.0)
    assert claim.job.job_id == job_id
    assert time.monotonic() - began >= GRACE_MS / 1000 * 2


async def test_renewing_a_confirmed_hand_off_changes_nothing(registry: Backend) -> None:
    started = await start(registry)
    await registry.jobs.handoff_done(TENANT, started.job.job_id)
    assert not await registry.jobs.renew_handoff(TENANT, started.job.job_id, LIMITS)
    assert await claims_within(registry, GRACE_MS / 1000 * 2) == []


async def test_after_the_last_attempt_the_claim_is_exhausted(registry: Backend) -> None:
    await start(registry)
    attempts = [await claims_within(registry, 3.0) for _ in range(3)]
    assert [(c.attempt, c.exhausted) for (c,) in attempts] == [(2, False), (3, False), (3, True)]


async def test_an_exhausted_claim_has_failed_the_job_when_it_returns(registry: Backend) -> None:
    started = await start(registry)
    job_id, session_id = started.job.job_id, started.job.session_id
    for _ in range(2):
        await claims_within(registry, 3.0)
    (claim,) = await claims_within(registry, 3.0)
    assert claim.exhausted

    job = await registry.jobs.get_job(TENANT, job_id)
    assert job is not None and job.state is JobState.FAILED
    page = await registry.events.read_after(TENANT, session_id, started.accepted.sequence, limit=10)
    (failed,) = page.events
    assert failed.kind is EventKind.FAILED and failed.job_id == job_id
    error = failed.data["error"]
    assert error["code"] == "handoff_failed" and error["retryable"] is True
    assert error["message"] == (
        "the job could not be handed to the query service (3 hand-offs interrupted)"
    )
    # A notice from an earlier hand-off, arriving after the claim, finds the job finished.
    late = Notice(NoticeEvent.PROGRESS, Service.QUERY, job_id, TENANT, 1, "agent-1", {})
    assert (await registry.jobs.apply_notice(late, LIMITS)).verdict is Verdict.JOB_FINISHED
    # ...and the session is free again.
    session = await registry.sessions.get_session(TENANT, session_id, touch=False)
    assert session is not None and not session.pending_job_ids
    assert await claims_within(registry, GRACE_MS / 1000 * 2) == []


async def test_a_job_past_its_deadline_is_exhausted_at_once(registry: Backend) -> None:
    short = JobLimits(
        deadline_ms=200,
        heartbeat_ms=60_000,
        retention_ms=60_000,
        handoff_grace_ms=GRACE_MS,
        handoff_attempts=3,
    )
    await start(registry, limits=short)
    (claim,) = await claims_within(registry, 3.0, short)
    assert claim.exhausted and claim.attempt == 1


async def test_an_enqueued_job_is_claimed_only_once_its_turn_came(registry: Backend) -> None:
    session_id = await new_session(registry)
    queued = rag_job(session_id)
    await start(registry, queued, hold=True)
    await registry.jobs.enqueue_done(TENANT, queued.job_id)
    assert await claims_within(registry, GRACE_MS / 1000 * 2) == []
    outcome = await registry.jobs.activate_job(TENANT, queued.job_id, LIMITS)
    assert outcome is ActivateOutcome.STARTED
    assert await registry.jobs.claim_handoffs(LIMITS, limit=10) == []
    (claim,) = await claims_within(registry, 3.0)
    assert replace(claim, deadline_ms=0) == HandoffClaim(TENANT, queued, attempt=2)


async def test_a_job_queued_behind_a_busy_session_is_not_claimed_while_it_waits(
    registry: Backend,
) -> None:
    session_id = await new_session(registry)
    first = await start(registry, rag_job(session_id))
    await registry.jobs.handoff_done(TENANT, first.job.job_id)
    behind = await start(registry, rag_job(session_id), if_busy=IfBusy.HOLD)
    assert behind.queued
    await registry.jobs.enqueue_done(TENANT, behind.job.job_id)
    assert await claims_within(registry, GRACE_MS / 1000 * 2) == []


async def test_a_queued_job_not_confirmed_on_the_work_queue_is_claimed_to_be_enqueued_again(
    registry: Backend,
) -> None:
    queued = replace(rag_job(await new_session(registry)), priority=QueuePriority.HIGH)
    started = await start(registry, queued, hold=True)
    began = time.monotonic()
    (claim,) = await claims_within(registry, 3.0)
    assert time.monotonic() - began >= GRACE_MS / 1000 * 0.8
    assert claim == HandoffClaim(
        TENANT,
        queued,
        attempt=2,
        requeue=True,
        accepted_sequence=started.accepted.sequence,
        deadline_ms=started.job.deadline_ms,
    )
    # The claim holds a new lease: nobody else enqueues it meanwhile.
    assert await registry.jobs.claim_handoffs(LIMITS, limit=10) == []


async def test_a_job_queued_behind_a_busy_session_is_claimed_to_be_enqueued_if_not_confirmed(
    registry: Backend,
) -> None:
    session_id = await new_session(registry)
    first = await start(registry, rag_job(session_id))
    await registry.jobs.handoff_done(TENANT, first.job.job_id)
    behind = await start(registry, rag_job(session_id), if_busy=IfBusy.HOLD)
    (claim,) = await claims_within(registry, 3.0)
    assert (claim.job.job_id, claim.requeue) == (behind.job.job_id, True)
    assert claim.accepted_sequence == behind.accepted.sequence


async def test_an_enqueue_in_progress_holds_its_lease_while_renewed(registry: Backend) -> None:
    started = await start(registry, hold=True)
    job_id = started.job.job_id
    for _ in range(3):
        await asyncio.sleep(GRACE_MS / 2000)
        assert await registry.jobs.renew_handoff(TENANT, job_id, LIMITS)
        assert await registry.jobs.claim_handoffs(LIMITS, limit=10) == []
    await registry.jobs.enqueue_done(TENANT, job_id)
    assert not await registry.jobs.renew_handoff(TENANT, job_id, LIMITS)


async def test_activating_a_queued_job_confirms_its_enqueue(registry: Backend) -> None:
    queued = rag_job(await new_session(registry))
    await start(registry, queued, hold=True)
    outcome = await registry.jobs.activate_job(TENANT, queued.job_id, LIMITS)
    assert outcome is ActivateOutcome.STARTED
    (claim,) = await claims_within(registry, 3.0)
    # A hand-off, not an enqueue.
    assert replace(claim, deadline_ms=0) == HandoffClaim(TENANT, queued, attempt=2)


async def test_a_queued_job_whose_enqueue_keeps_breaking_fails_with_the_reason(
    registry: Backend,
) -> None:
    started = await start(registry, hold=True)
    claims = [await claims_within(registry, 3.0) for _ in range(3)]
    assert [(c.requeue, c.exhausted) for (c,) in claims] == [
        (True, False),
        (True, False),
        (True, True),
    ]
    job = await registry.jobs.get_job(TENANT, started.job.job_id)
    assert job is not None and job.state is JobState.FAILED

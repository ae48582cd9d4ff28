"""The JobStore's session line on both backends: jobs that must wait are recorded QUEUED in the
order they were accepted, and a queued job starts only when it is first in line and nothing
accepted before it is still in flight."""

from __future__ import annotations

import asyncio

from domain.ids import new_id
from domain.jobs import (
    ActivateOutcome,
    EventDraft,
    EventKind,
    IfBusy,
    JobLimits,
    JobState,
    NewJob,
    Notice,
    NoticeEvent,
    SessionEvent,
    StartedJob,
    StartRefused,
    Verdict,
)
from domain.models import Service, WorkKind
from domain.service_caps import LimitReached
from registry.backend import Backend
from tests.support.registries import new_session

LIMITS = JobLimits(
    deadline_ms=60_000, heartbeat_ms=30_000, retention_ms=60_000, queue_timeout_ms=600_000
)
TENANT = "acme"


async def start(
    registry: Backend, session_id: str, if_busy: IfBusy = IfBusy.HOLD, *, hold: bool = False
) -> StartedJob:
    new = NewJob(new_id(), session_id, "agent-1", Service.QUERY, WorkKind.LLM_QUERY, "hi", "r")
    started = await registry.jobs.start_job(TENANT, new, LIMITS, if_busy=if_busy, hold=hold)
    assert isinstance(started, StartedJob)
    return started


async def complete(registry: Backend, job_id: str) -> None:
    notice = Notice(NoticeEvent.COMPLETED, Service.QUERY, job_id, TENANT, 1, data={})
    assert (await registry.jobs.apply_notice(notice, LIMITS)).verdict is Verdict.ACCEPTED


async def activate(registry: Backend, job_id: str) -> ActivateOutcome | LimitReached:
    return await registry.jobs.activate_job(TENANT, job_id, LIMITS)


async def test_a_job_on_an_idle_session_starts_pending(registry: Backend) -> None:
    started = await start(registry, await new_session(registry))
    assert not started.queued
    assert started.job.state is JobState.PENDING
    assert "queued" not in started.accepted.data


async def test_a_job_on_a_busy_session_is_queued_behind_the_one_in_flight(
    registry: Backend,
) -> None:
    session_id = await new_session(registry)
    first = await start(registry, session_id)
    second = await start(registry, session_id)
    assert second.queued
    assert second.accepted.data["queued"] is True
    job = await registry.jobs.get_job(TENANT, second.job.job_id)
    assert job is not None and job.state is JobState.QUEUED
    assert await activate(registry, second.job.job_id) is ActivateOutcome.WAIT
    await complete(registry, first.job.job_id)
    assert await activate(registry, second.job.job_id) is ActivateOutcome.STARTED
    job = await registry.jobs.get_job(TENANT, second.job.job_id)
    assert job is not None and job.state is JobState.PENDING


async def test_queued_jobs_start_in_the_order_they_were_accepted(registry: Backend) -> None:
    session_id = await new_session(registry)
    first = await start(registry, session_id)
    second = await start(registry, session_id)
    third = await start(registry, session_id)
    await complete(registry, first.job.job_id)
    assert await activate(registry, third.job.job_id) is ActivateOutcome.WAIT
    assert await activate(registry, second.job.job_id) is ActivateOutcome.STARTED
    # The second is in flight now: the third still waits for it.
    assert await activate(registry, third.job.job_id) is ActivateOutcome.WAIT
    await complete(registry, second.job.job_id)
    assert await activate(registry, third.job.job_id) is ActivateOutcome.STARTED


async def test_hold_queues_a_job_even_on_an_idle_session(registry: Backend) -> None:
    session_id = await new_session(registry)
    started = await start(registry, session_id, hold=True)
    assert started.queued
    assert await activate(registry, started.job.job_id) is ActivateOutcome.STARTED


async def test_run_starts_at_once_beside_jobs_in_flight_and_queued_jobs_wait_for_it(
    registry: Backend,
) -> None:
    session_id = await new_session(registry)
    await start(registry, session_id)
    running = await start(registry, session_id, IfBusy.RUN)
    assert not running.queued
    queued = await start(registry, session_id, hold=True)
    assert await activate(registry, queued.job.job_id) is ActivateOutcome.WAIT


async def test_reject_refuses_while_a_queued_job_waits(registry: Backend) -> None:
    session_id = await new_session(registry)
    await start(registry, session_id, hold=True)
    new = NewJob(new_id(), session_id, "agent-1", Service.QUERY, WorkKind.LLM_QUERY, "x", "r")
    refused = await registry.jobs.start_job(TENANT, new, LIMITS, if_busy=IfBusy.REJECT)
    assert refused is StartRefused.SESSION_BUSY


async def test_activating_twice_reports_already_started(registry: Backend) -> None:
    started = await start(registry, await new_session(registry), hold=True)
    assert await activate(registry, started.job.job_id) is ActivateOutcome.STARTED
    assert await activate(registry, started.job.job_id) is ActivateOutcome.ALREADY_STARTED


async def test_a_cancelled_queued_job_leaves_the_line(registry: Backend) -> None:
    session_id = await new_session(registry)
    first = await start(registry, session_id)
    second = await start(registry, session_id)
    third = await start(registry, session_id)
    draft = EventDraft(second.job.job_id, EventKind.CANCELLED, "r", {"reason": "x"})
    await registry.jobs.finish_job(TENANT, second.job.job_id, draft, LIMITS)
    assert await activate(registry, second.job.job_id) is ActivateOutcome.FINAL
    await complete(registry, first.job.job_id)
    assert await activate(registry, third.job.job_id) is ActivateOutcome.STARTED


async def test_a_notice_for_a_queued_job_is_refused_as_unknown(registry: Backend) -> None:
    session_id = await new_session(registry)
    await start(registry, session_id)
    queued = await start(registry, session_id)
    notice = Notice(NoticeEvent.PROGRESS, Service.QUERY, queued.job.job_id, TENANT, 1, data={})
    assert (await registry.jobs.apply_notice(notice, LIMITS)).verdict is Verdict.UNKNOWN_JOB


async def test_a_queued_job_on_a_closed_session_cannot_start(registry: Backend) -> None:
    session_id = await new_session(registry)
    queued = await start(registry, session_id, hold=True)
    await registry.sessions.close_session(TENANT, session_id)
    assert await activate(registry, queued.job.job_id) is ActivateOutcome.SESSION_NOT_OPEN


async def test_another_tenant_cannot_activate_a_job(registry: Backend) -> None:
    queued = await start(registry, await new_session(registry), hold=True)
    outcome = await registry.jobs.activate_job("globex", queued.job.job_id, LIMITS)
    assert outcome is ActivateOutcome.UNKNOWN_JOB


async def test_a_queued_job_times_out_after_the_queue_timeout(registry: Backend) -> None:
    limits = JobLimits(
        deadline_ms=60_000, heartbeat_ms=60_000, retention_ms=60_000, queue_timeout_ms=1
    )
    session_id = await new_session(registry)
    new = NewJob(new_id(), session_id, "agent-1", Service.QUERY, WorkKind.LLM_QUERY, "x", "r")
    started = await registry.jobs.start_job(TENANT, new, limits, if_busy=IfBusy.HOLD, hold=True)
    assert isinstance(started, StartedJob)
    reaped = await _reap_until_some(registry, limits)
    assert [e.job_id for e in reaped] == [new.job_id]
    assert reaped[0].kind is EventKind.TIMED_OUT


async def test_a_started_job_gets_fresh_deadlines(registry: Backend) -> None:
    session_id = await new_session(registry)
    queued = await start(registry, session_id, hold=True)
    before = await registry.jobs.get_job(TENANT, queued.job.job_id)
    assert before is not None and before.deadline_ms >= before.created_at_ms + 600_000
    await activate(registry, queued.job.job_id)
    after = await registry.jobs.get_job(TENANT, queued.job.job_id)
    assert after is not None
    assert after.deadline_ms <= after.updated_at_ms + LIMITS.deadline_ms
    assert after.heartbeat_deadline_ms == after.updated_at_ms + LIMITS.heartbeat_ms


async def _reap_until_some(registry: Backend, limits: JobLimits) -> list[SessionEvent]:
    """Reap until something times out (the queue timeout is 1 ms; bounded attempts)."""
    for _ in range(200):
        reaped = await registry.jobs.reap_expired(limits, limit=10)
        if reaped:
            return reaped
        await asyncio.sleep(0.005)
    raise AssertionError("nothing timed out")

"""The Redis job store remembers where each job lives (tenant, session) only while the job is
unfinished, within a bound: a steady stream of chats does not grow the process' memory."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from domain.ids import new_id
from domain.jobs import (
    EventDraft,
    EventKind,
    IfBusy,
    JobLimits,
    NewJob,
    Notice,
    NoticeEvent,
    StartedJob,
    Verdict,
)
from domain.models import NewSession, Service, TokenUsage, WorkKind
from registry import redis_jobs
from registry.backend import Backend, BackendConfig, open_backend
from registry.redis_jobs import RedisJobStore

LIMITS = JobLimits(
    deadline_ms=60_000, heartbeat_ms=30_000, retention_ms=60_000, queue_timeout_ms=600_000
)
TENANT = "acme"


@pytest.fixture
async def registry(redis_url: str) -> AsyncIterator[Backend]:
    opened = open_backend(
        BackendConfig(redis_url=redis_url, key_prefix="test", session_retention_ms=60_000)
    )
    yield opened
    await opened.aclose()


def store(registry: Backend) -> RedisJobStore:
    assert isinstance(registry.jobs, RedisJobStore)
    return registry.jobs


async def start_on_new_session(registry: Backend) -> StartedJob:
    session_id = new_id()
    await registry.sessions.create_session(
        TENANT, session_id, NewSession("agent-1", "", {}, 60_000)
    )
    new = NewJob(new_id(), session_id, "agent-1", Service.QUERY, WorkKind.LLM_QUERY, "hi", "r")
    started = await registry.jobs.start_job(TENANT, new, LIMITS, if_busy=IfBusy.RUN)
    assert isinstance(started, StartedJob)
    return started


def notice(job_id: str, event: NoticeEvent, sequence: int) -> Notice:
    data = {"result": {"text": "done"}} if event is NoticeEvent.COMPLETED else {"text": "x"}
    return Notice(
        event, Service.QUERY, job_id, TENANT, sequence, data=data, usage=TokenUsage(1, 2, 3)
    )


async def test_jobs_completed_by_their_service_leave_nothing_remembered(
    registry: Backend,
) -> None:
    for _ in range(20):
        job_id = (await start_on_new_session(registry)).job.job_id
        delta = await registry.jobs.apply_notice(notice(job_id, NoticeEvent.DELTA, 1), LIMITS)
        assert delta.verdict is Verdict.ACCEPTED
        done = await registry.jobs.apply_notice(notice(job_id, NoticeEvent.COMPLETED, 2), LIMITS)
        assert done.verdict is Verdict.ACCEPTED
    assert store(registry).remembered_locations == 0


async def test_jobs_cancelled_here_leave_nothing_remembered(registry: Backend) -> None:
    for _ in range(5):
        job_id = (await start_on_new_session(registry)).job.job_id
        draft = EventDraft(job_id, EventKind.CANCELLED, "r", {"reason": "test"})
        await registry.jobs.finish_job(TENANT, job_id, draft, LIMITS)
    assert store(registry).remembered_locations == 0


async def test_a_finished_job_is_still_found_by_a_late_notice(registry: Backend) -> None:
    job_id = (await start_on_new_session(registry)).job.job_id
    await registry.jobs.apply_notice(notice(job_id, NoticeEvent.COMPLETED, 1), LIMITS)
    late = await registry.jobs.apply_notice(notice(job_id, NoticeEvent.DELTA, 2), LIMITS)
    assert late.verdict is Verdict.JOB_FINISHED
    assert store(registry).remembered_locations == 0


async def test_unfinished_jobs_are_remembered_up_to_the_bound(
    registry: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_jobs, "_INDEX_CACHE_SIZE", 4)
    started = [await start_on_new_session(registry) for _ in range(7)]
    assert store(registry).remembered_locations == 4
    # The oldest, no longer remembered, are still found (one GET of the job index).
    first = started[0].job.job_id
    outcome = await registry.jobs.apply_notice(notice(first, NoticeEvent.DELTA, 1), LIMITS)
    assert outcome.verdict is Verdict.ACCEPTED

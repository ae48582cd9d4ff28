"""JobStore.count_unfinished on both backends: how many jobs of all tenants are queued, pending
and running right now (the source of the orchestrator_tasks gauge)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from domain.ids import new_id
from domain.jobs import (
    EventDraft,
    EventKind,
    FinishOutcome,
    IfBusy,
    JobLimits,
    JobState,
    NewJob,
    Notice,
    NoticeEvent,
    StartedJob,
    StartRefused,
    Verdict,
)
from domain.models import NewSession, Service, WorkKind
from registry.backend import Backend, BackendConfig, open_backend
from registry.keys import INDEX_SHARDS, KeySpace, shard_of
from registry.redis_client import create_redis
from registry.redis_jobs import RedisJobStore

LIMITS = JobLimits(deadline_ms=60_000, heartbeat_ms=60_000, retention_ms=60_000)
# A job record that expires (unfinished) a moment after its start.
SHORT_LIVED = JobLimits(deadline_ms=200, heartbeat_ms=200, retention_ms=100)
PREFIX = "test"


@pytest.fixture
async def registry(backend_url: str | None) -> AsyncIterator[Backend]:
    opened = open_backend(
        BackendConfig(redis_url=backend_url, key_prefix=PREFIX, session_retention_ms=60_000)
    )
    yield opened
    await opened.aclose()


def counts(
    pending: int = 0, running: int = 0, queued: int = 0, finishing: int = 0
) -> dict[JobState, int]:
    return {
        JobState.QUEUED: queued,
        JobState.PENDING: pending,
        JobState.RUNNING: running,
        JobState.FINISHING: finishing,
    }


async def start(registry: Backend, tenant: str = "acme", limits: JobLimits = LIMITS) -> StartedJob:
    session_id = new_id()
    await registry.sessions.create_session(tenant, session_id, NewSession("a1", "", {}, 60_000))
    new = NewJob(new_id(), session_id, "a1", Service.QUERY, WorkKind.LLM_QUERY, "hi", "r1")
    started = await registry.jobs.start_job(tenant, new, limits, if_busy=IfBusy.RUN)
    assert isinstance(started, StartedJob)
    return started


async def tell(registry: Backend, started: StartedJob, event: NoticeEvent, seq: int) -> None:
    job = started.job
    notice = Notice(event, Service.QUERY, job.job_id, job.tenant_id, seq, data={})
    assert (await registry.jobs.apply_notice(notice, LIMITS)).verdict is Verdict.ACCEPTED


async def wait_for_counts(registry: Backend, wanted: dict[JobState, int]) -> None:
    """Poll until the counts read as ``wanted`` (time must pass; there is no event)."""
    deadline = time.monotonic() + 5
    while (found := await registry.jobs.count_unfinished()) != wanted:
        assert time.monotonic() < deadline, f"counts stayed {found}, expected {wanted}"
        await asyncio.sleep(0.05)


async def test_no_jobs_count_zero_in_every_unfinished_state(registry: Backend) -> None:
    assert await registry.jobs.count_unfinished() == counts()


async def test_a_started_job_counts_as_pending(registry: Backend) -> None:
    await start(registry)
    await start(registry)
    assert await registry.jobs.count_unfinished() == counts(pending=2)


async def test_a_refused_start_is_not_counted(registry: Backend) -> None:
    started = await start(registry)
    again = NewJob(
        new_id(), started.job.session_id, "a1", Service.QUERY, WorkKind.LLM_QUERY, "hi", "r2"
    )
    refused = await registry.jobs.start_job("acme", again, LIMITS, if_busy=IfBusy.REJECT)
    assert refused is StartRefused.SESSION_BUSY
    assert await registry.jobs.count_unfinished() == counts(pending=1)


async def test_a_queued_job_counts_as_queued_until_its_turn_then_pending(
    registry: Backend,
) -> None:
    first = await start(registry)
    behind = NewJob(
        new_id(), first.job.session_id, "a1", Service.QUERY, WorkKind.LLM_QUERY, "hi", "r2"
    )
    queued = await registry.jobs.start_job("acme", behind, LIMITS, if_busy=IfBusy.HOLD)
    assert isinstance(queued, StartedJob) and queued.queued
    assert await registry.jobs.count_unfinished() == counts(pending=1, queued=1)
    await tell(registry, first, NoticeEvent.COMPLETED, 1)
    await registry.jobs.activate_job("acme", behind.job_id, LIMITS)
    assert await registry.jobs.count_unfinished() == counts(pending=1)


async def test_a_cancelled_queued_job_is_no_longer_counted(registry: Backend) -> None:
    first = await start(registry)
    behind = NewJob(
        new_id(), first.job.session_id, "a1", Service.QUERY, WorkKind.LLM_QUERY, "hi", "r2"
    )
    await registry.jobs.start_job("acme", behind, LIMITS, if_busy=IfBusy.HOLD)
    draft = EventDraft(behind.job_id, EventKind.CANCELLED, "r2", {"reason": "x"})
    await registry.jobs.finish_job("acme", behind.job_id, draft, LIMITS)
    assert await registry.jobs.count_unfinished() == counts(pending=1)


async def test_a_job_counts_as_running_from_its_first_progress_or_delta(
    registry: Backend,
) -> None:
    first, second, _ = await start(registry), await start(registry), await start(registry)
    await tell(registry, first, NoticeEvent.PROGRESS, 1)
    await tell(registry, first, NoticeEvent.DELTA, 2)
    await tell(registry, second, NoticeEvent.DELTA, 1)
    assert await registry.jobs.count_unfinished() == counts(pending=1, running=2)


@pytest.mark.parametrize("event", [NoticeEvent.COMPLETED, NoticeEvent.FAILED])
async def test_a_job_finished_by_its_service_is_not_counted(
    registry: Backend, event: NoticeEvent
) -> None:
    from_pending, from_running = await start(registry), await start(registry)
    await tell(registry, from_running, NoticeEvent.PROGRESS, 1)
    await tell(registry, from_pending, event, 1)
    await tell(registry, from_running, event, 2)
    assert await registry.jobs.count_unfinished() == counts()


async def test_a_cancelled_job_is_not_counted(registry: Backend) -> None:
    started = await start(registry)
    await tell(registry, started, NoticeEvent.PROGRESS, 1)
    draft = EventDraft(started.job.job_id, EventKind.CANCELLED, "r1", {"reason": "test"})
    outcome, _ = await registry.jobs.finish_job("acme", started.job.job_id, draft, LIMITS)
    assert outcome is FinishOutcome.DONE
    assert await registry.jobs.count_unfinished() == counts()


async def test_a_timed_out_job_is_not_counted(registry: Backend) -> None:
    limits = JobLimits(deadline_ms=100, heartbeat_ms=100, retention_ms=60_000)
    await start(registry, limits=limits)
    deadline = time.monotonic() + 5
    while not await registry.jobs.reap_expired(limits, limit=10):
        assert time.monotonic() < deadline, "the job never timed out"
        await asyncio.sleep(0.05)
    assert await registry.jobs.count_unfinished() == counts()


async def test_jobs_of_every_tenant_are_counted(registry: Backend) -> None:
    await start(registry, "acme")
    await tell(registry, await start(registry, "globex"), NoticeEvent.PROGRESS, 1)
    await start(registry, "initech")
    assert await registry.jobs.count_unfinished() == counts(pending=2, running=1)


async def test_a_job_whose_record_expired_unfinished_is_not_counted(
    registry: Backend,
) -> None:
    await start(registry, limits=LIMITS)
    vanishing = await start(registry, limits=SHORT_LIVED)
    await wait_for_counts(registry, counts(pending=1))
    assert await registry.jobs.get_job("acme", vanishing.job.job_id) is None


async def test_redis_keeps_no_sets_of_finished_or_vanished_jobs(redis_url: str) -> None:
    registry = open_backend(
        BackendConfig(redis_url=redis_url, key_prefix=PREFIX, session_retention_ms=60_000)
    )
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        pending = await start(registry)
        await start(registry, limits=SHORT_LIVED)
        await wait_for_counts(registry, counts(pending=1))
        # The next start trims the vanished job; finishing the others empties both sets.
        running = await start(registry)
        await tell(registry, running, NoticeEvent.PROGRESS, 1)
        await tell(registry, running, NoticeEvent.COMPLETED, 2)
        await tell(registry, pending, NoticeEvent.FAILED, 1)
        keys = KeySpace(PREFIX)
        for state in (JobState.PENDING, JobState.RUNNING):
            assert await redis.exists(keys.jobs_in_state("acme", state.value)) == 0
    finally:
        await redis.aclose()
        await registry.aclose()


@pytest.fixture(params=["redis", "cluster"])
def store_url(request: pytest.FixtureRequest) -> str:
    """One Redis, or the Redis Cluster (where unlisting tenants is one slot per script)."""
    return str(request.getfixturevalue("redis_url" if request.param == "redis" else "cluster_url"))


async def test_redis_forgets_tenants_with_nothing_unfinished_when_counting(
    store_url: str,
) -> None:
    registry = open_backend(
        BackendConfig(redis_url=store_url, key_prefix=PREFIX, session_retention_ms=60_000)
    )
    redis = create_redis(store_url, socket_timeout_s=2.0, connect_timeout_s=1.0)
    keys = KeySpace(PREFIX)

    async def listed() -> set[str]:
        return {
            str(tenant)
            for shard in range(INDEX_SHARDS)
            for tenant in await redis.hkeys(keys.job_tenants(shard))
        }

    try:
        done = await start(registry, "globex")
        await tell(registry, done, NoticeEvent.COMPLETED, 1)
        await start(registry, "acme")
        # Tenants of several slots (and shards) are counted and unlisted in one call.
        idle = [f"idle-{n}" for n in range(8)]
        for tenant in idle:
            ended = await start(registry, tenant)
            await tell(registry, ended, NoticeEvent.FAILED, 1)
        assert await listed() == {"acme", "globex", *idle}

        assert await registry.jobs.count_unfinished() == counts(pending=1)
        assert await listed() == {"acme"}
        assert await redis.exists(keys.tenant_listing("globex")) == 0
        # A tenant that starts again is counted again.
        await start(registry, "globex")
        assert await registry.jobs.count_unfinished() == counts(pending=2)
        assert await listed() == {"acme", "globex"}
    finally:
        await redis.aclose()
        await registry.aclose()


async def test_unlisting_a_tenant_under_a_listing_it_no_longer_has_keeps_it(
    store_url: str,
) -> None:
    """The race with a start that lists the tenant anew between count_unfinished's read and its
    unlisting: the stale listing unlists nothing."""
    registry = open_backend(
        BackendConfig(redis_url=store_url, key_prefix=PREFIX, session_retention_ms=60_000)
    )
    redis = create_redis(store_url, socket_timeout_s=2.0, connect_timeout_s=1.0)
    keys = KeySpace(PREFIX)
    shard = keys.job_tenants(shard_of("globex"))
    try:
        first = await start(registry, "globex")
        await tell(registry, first, NoticeEvent.COMPLETED, 1)
        stale = str(await redis.hget(shard, "globex"))
        # Unlisted by another counter, then listed anew by a start that has ended since.
        await redis.delete(keys.tenant_listing("globex"))
        second = await start(registry, "globex")
        await tell(registry, second, NoticeEvent.COMPLETED, 1)
        assert str(await redis.hget(shard, "globex")) == second.job.job_id != stale

        jobs = registry.jobs
        assert isinstance(jobs, RedisJobStore)
        await jobs._unlist(["globex"], {"globex": stale})
        assert str(await redis.hget(shard, "globex")) == second.job.job_id
        # Under its current listing it goes.
        assert await jobs.count_unfinished() == counts()
        assert await redis.hget(shard, "globex") is None
    finally:
        await redis.aclose()
        await registry.aclose()

"""The reaper's deadline set on Redis: a job enters it in the same round trip as its start
script, scored no later than its real deadline, and an early look only moves it to that
deadline (it never times a job out early)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from domain.ids import new_id
from domain.jobs import IfBusy, JobLimits, NewJob, StartedJob, StartRefused
from domain.models import NewSession, Service, WorkKind
from domain.service_caps import LimitReached
from registry.backend import Backend, BackendConfig, open_backend
from registry.keys import KeySpace, shard_of

LIMITS = JobLimits(
    deadline_ms=60_000, heartbeat_ms=30_000, retention_ms=60_000, queue_timeout_ms=600_000
)
TENANT = "acme"
KEYS = KeySpace("test")


def deadlines(started: StartedJob) -> str:
    """The shard of the deadline hints the job is in."""
    return KEYS.job_deadlines(shard_of(started.job.job_id))


@pytest.fixture
async def registry(redis_url: str) -> AsyncIterator[Backend]:
    opened = open_backend(
        BackendConfig(redis_url=redis_url, key_prefix="test", session_retention_ms=60_000)
    )
    yield opened
    await opened.aclose()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def start(
    registry: Backend, session_id: str, if_busy: IfBusy
) -> StartedJob | StartRefused | LimitReached:
    new = NewJob(new_id(), session_id, "agent-1", Service.QUERY, WorkKind.LLM_QUERY, "hi", "r")
    return await registry.jobs.start_job(TENANT, new, LIMITS, if_busy=if_busy)


async def new_session(registry: Backend) -> str:
    session_id = new_id()
    await registry.sessions.create_session(
        TENANT, session_id, NewSession("agent-1", "", {}, 60_000)
    )
    return session_id


def member(started: StartedJob) -> str:
    return f"{TENANT} {started.job.session_id} {started.job.job_id}"


async def test_a_started_job_is_timed_no_later_than_its_deadline(
    registry: Backend, redis: Redis
) -> None:
    started = await start(registry, await new_session(registry), IfBusy.RUN)
    assert isinstance(started, StartedJob)
    score = await redis.zscore(deadlines(started), member(started))
    assert score is not None
    assert score <= started.accepted.data["deadline_ms"]


async def test_an_early_look_moves_the_job_to_its_deadline(registry: Backend, redis: Redis) -> None:
    started = await start(registry, await new_session(registry), IfBusy.RUN)
    assert isinstance(started, StartedJob)
    await redis.zadd(deadlines(started), {member(started): 0})

    assert await registry.jobs.reap_expired(LIMITS, limit=10) == []
    assert (
        await redis.zscore(deadlines(started), member(started))
        == started.accepted.data["deadline_ms"]
    )
    job = await registry.jobs.get_job(TENANT, started.job.job_id)
    assert job is not None and not job.state.is_final


async def test_a_refused_start_leaves_nothing_to_time(registry: Backend, redis: Redis) -> None:
    session_id = await new_session(registry)
    assert isinstance(await start(registry, session_id, IfBusy.RUN), StartedJob)
    refused = await start(registry, session_id, IfBusy.REJECT)
    assert isinstance(refused, StartRefused)
    assert sum([await redis.zcard(key) for key in KEYS.hint_keys("job-deadlines")]) == 1


async def test_the_reaper_drains_the_unsharded_hints_of_earlier_releases(
    registry: Backend, redis: Redis
) -> None:
    started = await start(registry, await new_session(registry), IfBusy.RUN)
    assert isinstance(started, StartedJob)
    await redis.zrem(deadlines(started), member(started))
    unsharded = KEYS.hint_keys("job-deadlines")[-1]
    assert unsharded == "test:job-deadlines"
    await redis.zadd(unsharded, {member(started): 0})

    assert await registry.jobs.reap_expired(LIMITS, limit=10) == []
    # Looked at early: moved to its real due time in the set it was found in.
    assert await redis.zscore(unsharded, member(started)) == started.accepted.data["deadline_ms"]

"""Every Redis script runs in one round trip once Redis holds it (EVALSHA, never a SCRIPT EXISTS
first), alone or in a pipeline, and a Redis that lost its scripts (restarted) loads them again
on the NOSCRIPT reply: three round trips once, then one again."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from domain.ids import new_id
from domain.jobs import IfBusy, JobLimits, NewJob, Notice, NoticeEvent, StartedJob, Verdict
from domain.models import NewSession, Service, WorkKind
from domain.ports.queue import NewWorkItem, QueuePriority, WorkQueue
from domain.rate_limits import Rate, RateLimitRules
from registry.backend import Backend, BackendConfig, open_backend
from registry.keys import KeySpace
from registry.redis_client import create_redis
from registry.redis_rate_limiter import RedisRateLimiter
from tests.support.registries import count_round_trips, opened_registry

LIMITS = JobLimits(
    deadline_ms=60_000,
    heartbeat_ms=30_000,
    retention_ms=60_000,
    queue_timeout_ms=600_000,
    handoff_grace_ms=5_000,
)
TENANT = "acme"


@pytest.fixture
async def registry(redis_url: str) -> AsyncIterator[Backend]:
    async with opened_registry(redis_url) as opened:
        yield opened


@pytest.fixture
async def queue(redis_url: str) -> AsyncIterator[WorkQueue]:
    backend = open_backend(
        BackendConfig(redis_url=redis_url, key_prefix="test", session_retention_ms=60_000)
    )
    yield backend.work_queue("work")
    await backend.aclose()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the requests any Redis client of this process writes (one per round trip)."""
    return count_round_trips(monkeypatch)


async def count(round_trips: list[int], operation: Callable[[], Awaitable[Any]]) -> int:
    round_trips.clear()
    await operation()
    return len(round_trips)


async def started_job(registry: Backend) -> StartedJob:
    session_id = new_id()
    await registry.sessions.create_session(
        TENANT, session_id, NewSession("agent-1", "", {}, 60_000)
    )
    new = NewJob(new_id(), session_id, "agent-1", Service.QUERY, WorkKind.LLM_QUERY, "hi", "r")
    started = await registry.jobs.start_job(TENANT, new, LIMITS, if_busy=IfBusy.HOLD)
    assert isinstance(started, StartedJob)
    return started


def progress(job_id: str, sequence: int) -> Notice:
    return Notice(NoticeEvent.PROGRESS, Service.QUERY, job_id, TENANT, sequence, data={"n": 1})


def work_item() -> NewWorkItem:
    return NewWorkItem(new_id(), TENANT, "test", b"payload", QueuePriority.NORMAL)


async def test_a_job_start_is_its_id_claim_and_one_round_trip_and_a_notice_one(
    registry: Backend, round_trips: list[int]
) -> None:
    warm_up = (await started_job(registry)).job.job_id
    await registry.jobs.apply_notice(progress(warm_up, 1), LIMITS)  # Redis now holds the scripts
    job_id = (await started_job(registry)).job.job_id

    async def notice() -> None:
        assert (await registry.jobs.apply_notice(progress(job_id, 1), LIMITS)).verdict is (
            Verdict.ACCEPTED
        )

    # session + start
    assert await count(round_trips, lambda: started_job(registry)) == 2
    assert await count(round_trips, notice) == 1


async def test_an_enqueue_a_dequeue_and_an_ack_are_one_round_trip_each(
    queue: WorkQueue, round_trips: list[int]
) -> None:
    await queue.enqueue([work_item()])
    await queue.complete([(item, b"ok") for item in await queue.dequeue("c1", count=1, lease_ms=9)])

    assert await count(round_trips, lambda: queue.enqueue([work_item()])) == 1
    round_trips.clear()
    items = await queue.dequeue("c1", count=1, lease_ms=60_000)
    assert len(round_trips) == 1 and len(items) == 1
    assert await count(round_trips, lambda: queue.complete([(items[0], b"ok")])) == 1


async def test_a_rate_limit_check_is_one_round_trip(redis_url: str, round_trips: list[int]) -> None:
    client = create_redis(redis_url, socket_timeout_s=1.0, connect_timeout_s=0.5)
    limiter = RedisRateLimiter(client, KeySpace("test"))
    buckets = RateLimitRules(Rate(per_second=100, burst=100)).buckets(TENANT, "k1")
    try:
        await limiter.acquire(buckets)
        assert await count(round_trips, lambda: limiter.acquire(buckets)) == 1
    finally:
        await client.aclose()


async def test_a_redis_that_lost_its_scripts_loads_them_again_once(
    registry: Backend, redis: Redis, round_trips: list[int]
) -> None:
    job_id = (await started_job(registry)).job.job_id
    await redis.script_flush()  # as after a restart without its data

    async def notice(sequence: int) -> None:
        outcome = await registry.jobs.apply_notice(progress(job_id, sequence), LIMITS)
        assert outcome.verdict is Verdict.ACCEPTED

    # EVALSHA answered NOSCRIPT, SCRIPT LOAD, EVALSHA again...
    assert await count(round_trips, lambda: notice(1)) == 3
    # ...and from then on one round trip.
    assert await count(round_trips, lambda: notice(2)) == 1


async def test_a_rate_limit_check_after_redis_lost_its_scripts_loads_it_and_goes_on(
    redis_url: str, redis: Redis, round_trips: list[int]
) -> None:
    client = create_redis(redis_url, socket_timeout_s=1.0, connect_timeout_s=0.5)
    limiter = RedisRateLimiter(client, KeySpace("test"))
    buckets = RateLimitRules(Rate(per_second=100, burst=100)).buckets(TENANT, "k1")
    try:
        assert (await limiter.acquire(buckets)).allowed
        await redis.script_flush()
        # EVALSHA answered NOSCRIPT, then the ordinary path: EVALSHA, SCRIPT LOAD, EVALSHA...
        assert await count(round_trips, lambda: limiter.acquire(buckets)) == 4
        # ...and from then on one round trip again.
        assert await count(round_trips, lambda: limiter.acquire(buckets)) == 1
    finally:
        await client.aclose()

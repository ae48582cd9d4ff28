"""Job scripts on Redis go with the job's hints in one round trip: a start (after claiming the
job id in the index), and a queued job's activation, send the script and the job's entries in
the reaper's deadline set and the hand-off set together, so no process dying between two
commands can leave a started job without its hand-off check (or timed by its queue timeout),
and a chat pays two round trips for its start. Hints only ever move earlier there, so an
activation that starts nothing never delays the reaper or the recovery. A Redis that lost its
scripts (restarted) still runs them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from domain.agents import AgentConfig, AgentKind
from domain.ids import new_id
from domain.jobs import (
    ActivateOutcome,
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
from domain.plans import plan_for
from registry.backend import Backend
from registry.keys import KeySpace, shard_of
from tests.support.registries import count_round_trips, new_session, opened_registry

LIMITS = JobLimits(
    deadline_ms=60_000,
    heartbeat_ms=30_000,
    retention_ms=60_000,
    queue_timeout_ms=600_000,
    handoff_grace_ms=5_000,
)
TENANT = "acme"
KEYS = KeySpace("test")


@pytest.fixture
async def registry(redis_url: str) -> AsyncIterator[Backend]:
    async with opened_registry(redis_url) as opened:
        yield opened


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the requests any Redis client of this process writes (one per round trip)."""
    return count_round_trips(monkeypatch)


async def new_job(registry: Backend) -> NewJob:
    session_id = await new_session(registry)
    return NewJob(new_id(), session_id, "agent-1", Service.QUERY, WorkKind.LLM_QUERY, "hi", "r")


async def start(registry: Backend, *, hold: bool = False) -> StartedJob:
    new = await new_job(registry)
    started = await registry.jobs.start_job(TENANT, new, LIMITS, if_busy=IfBusy.HOLD, hold=hold)
    assert isinstance(started, StartedJob) and started.queued == hold
    return started


async def queued_job(registry: Backend) -> StartedJob:
    return await start(registry, hold=True)


def member(started: StartedJob) -> str:
    return f"{TENANT} {started.job.session_id} {started.job.job_id}"


def shard(started: StartedJob) -> int:
    """The shard of the job's hints."""
    return shard_of(started.job.job_id)


async def test_a_start_is_one_round_trip_with_its_hints(
    registry: Backend, redis: Redis, round_trips: list[int]
) -> None:
    await start(registry)  # the first run loads the script
    new = await new_job(registry)
    round_trips.clear()

    started = await registry.jobs.start_job(TENANT, new, LIMITS, if_busy=IfBusy.HOLD)

    assert isinstance(started, StartedJob)
    assert len(round_trips) == 1
    assert await redis.zscore(KEYS.job_handoffs(shard(started)), member(started)) is not None
    assert await redis.zscore(KEYS.job_deadlines(shard(started)), member(started)) is not None


async def test_an_activation_writes_its_hand_off_check_in_the_round_trip_of_its_script(
    registry: Backend, redis: Redis, round_trips: list[int]
) -> None:
    warm_up = await queued_job(registry)  # the first run loads the script
    await registry.jobs.activate_job(TENANT, warm_up.job.job_id, LIMITS)
    started = await queued_job(registry)
    job_id = started.job.job_id
    await redis.zrem(
        KEYS.job_handoffs(shard(started)), member(started)
    )  # as if its entry was looked at
    round_trips.clear()

    outcome = await registry.jobs.activate_job(TENANT, job_id, LIMITS)
    activated_ms = time.time() * 1000

    assert outcome is ActivateOutcome.STARTED
    assert len(round_trips) == 1
    lease_end = await redis.zscore(KEYS.job_handoffs(shard(started)), member(started))
    assert lease_end is not None
    assert lease_end <= activated_ms + LIMITS.handoff_grace_ms
    # ...and the reaper looks at it by its new deadline, not by the queue timeout.
    due = await redis.zscore(KEYS.job_deadlines(shard(started)), member(started))
    assert due is not None and due <= activated_ms + LIMITS.heartbeat_ms


async def test_an_activation_of_a_started_job_never_moves_its_hints_later(
    registry: Backend, redis: Redis
) -> None:
    started = await queued_job(registry)
    job_id = started.job.job_id
    assert await registry.jobs.activate_job(TENANT, job_id, LIMITS) is ActivateOutcome.STARTED
    job = await registry.jobs.get_job(TENANT, job_id)
    assert job is not None
    due = min(job.deadline_ms, job.heartbeat_deadline_ms)
    lease = float(await redis.hget(KEYS.job(TENANT, job_id), "hol") or 0)
    longer = replace(LIMITS, deadline_ms=600_000, heartbeat_ms=600_000, handoff_grace_ms=600_000)

    # Its work item redelivered, with longer limits: the script starts nothing.
    again = await registry.jobs.activate_job(TENANT, job_id, longer)

    assert again is ActivateOutcome.ALREADY_STARTED
    deadline_hint = await redis.zscore(KEYS.job_deadlines(shard(started)), member(started))
    assert deadline_hint is not None and deadline_hint <= due
    handoff_hint = await redis.zscore(KEYS.job_handoffs(shard(started)), member(started))
    assert handoff_hint is not None and handoff_hint <= lease


async def test_a_redis_that_lost_its_scripts_still_starts_and_activates_jobs(
    registry: Backend, redis: Redis
) -> None:
    await queued_job(registry)  # the scripts are loaded...
    await redis.script_flush()  # ...and gone, as after a restart

    started = await queued_job(registry)
    outcome = await registry.jobs.activate_job(TENANT, started.job.job_id, LIMITS)

    assert outcome is ActivateOutcome.STARTED
    job = await registry.jobs.get_job(TENANT, started.job.job_id)
    assert job is not None and job.state is JobState.PENDING


async def test_confirming_several_hand_offs_is_one_round_trip(
    registry: Backend, redis: Redis, round_trips: list[int]
) -> None:
    started = [await start(registry) for _ in range(5)]
    round_trips.clear()

    await registry.jobs.handoffs_done([(TENANT, s.job.job_id) for s in started])

    assert len(round_trips) == 1
    for s in started:
        assert await redis.zscore(KEYS.job_handoffs(shard(s)), member(s)) is None
        assert not await redis.hexists(KEYS.job(TENANT, s.job.job_id), "hol")


async def test_a_completed_notice_is_one_round_trip_with_its_finalize_hint(
    registry: Backend, redis: Redis, round_trips: list[int]
) -> None:
    """Only a job that may turn FINISHING gets a finalize hint, in the notice's round trip: not
    one this process started without history to append."""
    agent = AgentConfig(TENANT, "agent-1", AgentKind.LLM, 1)
    planned = replace(
        await new_job(registry), plan=plan_for(WorkKind.LLM_QUERY, agent, now_ms=1), agent=agent
    )
    plain = await new_job(registry)
    warm_up = await start(registry)  # the first notice loads the script
    await registry.jobs.apply_notice(
        Notice(NoticeEvent.COMPLETED, Service.QUERY, warm_up.job.job_id, TENANT, 1, "", {}), LIMITS
    )
    for new in (planned, plain):
        started = await registry.jobs.start_job(TENANT, new, LIMITS, if_busy=IfBusy.RUN)
        assert isinstance(started, StartedJob)
        round_trips.clear()
        done = Notice(NoticeEvent.COMPLETED, Service.QUERY, new.job_id, TENANT, 1, "", {})
        outcome = await registry.jobs.apply_notice(done, LIMITS)
        assert len(round_trips) == 1
        hint = await redis.zscore(KEYS.job_finalizes(shard(started)), member(started))
        assert (hint is not None) == (new is planned)
        assert (outcome.finishing is not None) == (new is planned)


def delta(job_id: str, sequence: int) -> Notice:
    return Notice(NoticeEvent.DELTA, Service.QUERY, job_id, TENANT, sequence, "", {"text": "x"})


async def test_notices_applied_together_are_one_round_trip(
    registry: Backend, round_trips: list[int]
) -> None:
    """Several jobs' notices, a completed one with its finalize hint among them: one pipeline."""
    jobs = [(await start(registry)).job.job_id for _ in range(3)]
    await registry.jobs.apply_notice(delta(jobs[0], 1), LIMITS)  # the script is loaded
    round_trips.clear()
    burst = [delta(jobs[0], 2), delta(jobs[1], 1), delta(jobs[0], 3), delta(jobs[2], 1)]
    burst.append(Notice(NoticeEvent.COMPLETED, Service.QUERY, jobs[1], TENANT, 2, "", {}))
    outcomes = await registry.jobs.apply_notices(burst, LIMITS)
    assert len(round_trips) == 1
    assert [getattr(o, "verdict", o) for o in outcomes] == [Verdict.ACCEPTED] * 5


async def test_notices_of_jobs_this_process_does_not_know_cost_one_more_round_trip(
    registry: Backend, redis_url: str, round_trips: list[int]
) -> None:
    """The job index is read for all of them at once (another replica started them)."""
    jobs = [(await start(registry)).job.job_id for _ in range(3)]
    async with opened_registry(redis_url) as other:
        await other.jobs.apply_notice(delta(new_id(), 1), LIMITS)  # connected, nothing loaded
        round_trips.clear()
        burst = [delta(job_id, 1) for job_id in jobs] + [delta(new_id(), 1)]
        outcomes = await other.jobs.apply_notices(burst, LIMITS)
        assert len(round_trips) == 2
    verdicts = [getattr(o, "verdict", o) for o in outcomes]
    assert verdicts == [Verdict.ACCEPTED] * 3 + [Verdict.UNKNOWN_JOB]


async def test_a_burst_on_a_redis_that_lost_its_scripts_applies_each_notice_once(
    registry: Backend, redis: Redis
) -> None:
    jobs = [(await start(registry)).job.job_id for _ in range(2)]
    await redis.script_flush()
    burst = [delta(jobs[0], 0), delta(jobs[1], 0), delta(jobs[0], 0)]
    outcomes = await registry.jobs.apply_notices(burst, LIMITS)
    assert [getattr(o, "verdict", o) for o in outcomes] == [Verdict.ACCEPTED] * 3
    first = await registry.jobs.get_job(TENANT, jobs[0])
    second = await registry.jobs.get_job(TENANT, jobs[1])
    assert first is not None and second is not None
    assert (first.last_notice_sequence, second.last_notice_sequence) == (2, 1)


async def test_a_notice_whose_script_fails_leaves_the_others_of_its_burst_applied(
    registry: Backend, redis: Redis
) -> None:
    broken, fine = [(await start(registry)).job.job_id for _ in range(2)]
    # A job record the script cannot read (its notice sequence is no number).
    await redis.hset(KEYS.job(TENANT, broken), "nseq", "x")
    outcomes = await registry.jobs.apply_notices([delta(broken, 0), delta(fine, 0)], LIMITS)
    assert isinstance(outcomes[0], ResponseError)
    assert getattr(outcomes[1], "verdict", None) is Verdict.ACCEPTED

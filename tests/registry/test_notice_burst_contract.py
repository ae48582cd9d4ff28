"""Notices applied together (NoticeProcessor.process_each -> JobStore.apply_notices, one round
trip on Redis) on both backends: each notice gets the verdict it gets applied alone, in order,
those of one job in their order; a rejected notice changes nothing for the others; an accepted
notice's event is appended exactly once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from domain.identity import Caller, Role
from domain.ids import new_id
from domain.jobs import (
    IfBusy,
    JobLimits,
    JobState,
    NewJob,
    NoticeEvent,
    NoticeOutcome,
    StartedJob,
    Verdict,
)
from domain.models import Service, TokenUsage, WorkKind
from domain.notices import NoticeInput, NoticeProcessor
from registry.backend import Backend
from tests.support.registries import new_session

TENANT = "acme"
OTHER = "globex"
LIMITS = JobLimits(deadline_ms=60_000, heartbeat_ms=60_000, retention_ms=60_000)
QUERY_KEY = Caller(TENANT, Role.SERVICE, "k1", frozenset({Service.QUERY}))


@dataclass(frozen=True, slots=True)
class Jobs:
    a: str
    b: str
    session_a: str
    session_b: str


async def start(registry: Backend, tenant: str = TENANT) -> tuple[str, str]:
    session_id = await new_session(registry, tenant)
    job_id = new_id()
    new = NewJob(job_id, session_id, "agent-1", Service.QUERY, WorkKind.LLM_QUERY, "hi", "r1")
    started = await registry.jobs.start_job(tenant, new, LIMITS, if_busy=IfBusy.RUN)
    assert isinstance(started, StartedJob)
    return job_id, session_id


async def two_jobs(registry: Backend) -> Jobs:
    a, session_a = await start(registry)
    b, session_b = await start(registry)
    return Jobs(a, b, session_a, session_b)


def notice(
    event: NoticeEvent,
    job_id: str,
    sequence: int | None,
    *,
    tenant: str = TENANT,
    service: Service = Service.QUERY,
    data: dict[str, Any] | None = None,
) -> NoticeInput:
    if data is None:
        data = {"text": "x"} if event is NoticeEvent.DELTA else {}
        if event is NoticeEvent.COMPLETED:
            data = {"result": {"text": "done", "model": "m1"}}
    usage = TokenUsage(1, 2, 3) if event is NoticeEvent.COMPLETED else TokenUsage()
    return NoticeInput(event, service, job_id, tenant, sequence, "agent-1", data, usage)


def mixed_burst(jobs: Jobs) -> list[NoticeInput]:
    """Good ones, and every way a notice is turned down, interleaved over two jobs."""
    delta, done = NoticeEvent.DELTA, NoticeEvent.COMPLETED
    return [
        notice(delta, jobs.a, 1),
        notice(NoticeEvent.PROGRESS, jobs.b, 1, data={"fraction": 0.5, "message": "half"}),
        notice(delta, jobs.a, 1),  # duplicate
        notice(delta, jobs.a, 2, tenant=OTHER),  # another tenant's job id: wrong tenant
        notice(delta, new_id(), 1),  # unknown job
        NoticeInput.malformed_frame("notice: not a valid frame"),
        notice(delta, jobs.b, 2, service=Service.EMBEDDING),  # the key does not speak for it
        notice(delta, jobs.a, 2, data={"text": 5}),  # malformed: the delta is not text
        notice(delta, jobs.a, 2),
        notice(done, jobs.a, 3),
        notice(delta, jobs.a, 4),  # after its job completed: job finished
        notice(delta, jobs.b, None),  # unnumbered: applied in arrival order
        notice(done, jobs.b, None),
        notice(delta, jobs.b, None),  # job finished
    ]


def summary(outcomes: list[NoticeOutcome | Exception]) -> list[tuple[Any, ...]]:
    """What a burst's outcomes say, without the ids that differ between two runs."""
    out: list[tuple[Any, ...]] = []
    for outcome in outcomes:
        assert isinstance(outcome, NoticeOutcome), outcome
        event = outcome.event
        out.append(
            (
                outcome.verdict,
                outcome.detail,
                None if event is None else (event.kind, event.sequence, dict(event.data)),
            )
        )
    return out


EXPECTED_VERDICTS = [
    Verdict.ACCEPTED,
    Verdict.ACCEPTED,
    Verdict.DUPLICATE,
    Verdict.WRONG_TENANT,
    Verdict.UNKNOWN_JOB,
    Verdict.MALFORMED,
    Verdict.WRONG_SERVICE,
    Verdict.MALFORMED,
    Verdict.ACCEPTED,
    Verdict.ACCEPTED,
    Verdict.JOB_FINISHED,
    Verdict.ACCEPTED,
    Verdict.ACCEPTED,
    Verdict.JOB_FINISHED,
]


async def one_by_one(
    processor: NoticeProcessor, raws: list[NoticeInput]
) -> list[NoticeOutcome | Exception]:
    return [await processor.process(raw, QUERY_KEY) for raw in raws]


async def together(
    processor: NoticeProcessor, raws: list[NoticeInput]
) -> list[NoticeOutcome | Exception]:
    return await processor.process_each(raws, QUERY_KEY)


Apply = Callable[[NoticeProcessor, list[NoticeInput]], Any]


async def run_burst(registry: Backend, apply: Apply) -> tuple[Jobs, list[Any]]:
    jobs = await two_jobs(registry)
    # The other tenant has a job of its own: its id is no key to acme's.
    await start(registry, OTHER)
    processor = NoticeProcessor(registry.jobs, LIMITS)
    outcomes = await apply(processor, mixed_burst(jobs))
    return jobs, outcomes


async def test_a_mixed_burst_applied_together_gets_the_verdicts_it_gets_one_by_one(
    registry: Backend,
) -> None:
    _, alone = await run_burst(registry, one_by_one)
    jobs, burst = await run_burst(registry, together)
    assert [s[0] for s in summary(burst)] == EXPECTED_VERDICTS
    assert summary(burst) == summary(alone)
    a = await registry.jobs.get_job(TENANT, jobs.a)
    b = await registry.jobs.get_job(TENANT, jobs.b)
    assert a is not None and b is not None
    assert (a.state, a.last_notice_sequence) == (JobState.COMPLETED, 3)
    assert (b.state, b.last_notice_sequence) == (JobState.COMPLETED, 3)
    assert a.usage == b.usage == TokenUsage(1, 2, 3)


async def test_each_accepted_notice_of_a_burst_appends_its_event_once(registry: Backend) -> None:
    jobs, burst = await run_burst(registry, together)
    for job_id, session_id in ((jobs.a, jobs.session_a), (jobs.b, jobs.session_b)):
        page = await registry.events.read_after(TENANT, session_id, 0, limit=100)
        logged = [(e.kind, e.sequence) for e in page.events if e.job_id == job_id]
        accepted = [
            (o.event.kind, o.event.sequence)
            for o in burst
            if isinstance(o, NoticeOutcome) and o.event is not None and o.event.job_id == job_id
        ]
        assert logged[1:] == accepted  # after the job's `accepted` event, each one once
        assert len(set(logged)) == len(logged)


async def test_a_burst_of_one_jobs_notices_applies_them_in_their_order(
    registry: Backend,
) -> None:
    job_id, _ = await start(registry)
    processor = NoticeProcessor(registry.jobs, LIMITS)
    raws = [notice(NoticeEvent.DELTA, job_id, None, data={"text": str(n)}) for n in range(20)]
    outcomes = await processor.process_each(raws, QUERY_KEY)
    texts = []
    for outcome in outcomes:
        assert isinstance(outcome, NoticeOutcome) and outcome.event is not None
        texts.append(outcome.event.data["text"])
    assert texts == [str(n) for n in range(20)]
    job = await registry.jobs.get_job(TENANT, job_id)
    assert job is not None and job.last_notice_sequence == 20

"""The JobStore keeps the trace context a job was accepted under, on both backends: the job
reads it back, a hand-off claim and a finalize claim carry it (another process continues the
job's trace), and an accepted notice's outcome names it (its handling is a span in that trace);
a rejected notice's does not."""

from __future__ import annotations

import asyncio
import time

from domain.agents import AgentConfig, AgentKind
from domain.ids import new_id
from domain.jobs import (
    HandoffClaim,
    IfBusy,
    JobLimits,
    NewJob,
    Notice,
    NoticeEvent,
    StartedJob,
    Verdict,
)
from domain.models import Service, TokenUsage, WorkKind
from domain.plans import plan_for
from registry.backend import Backend
from tests.support.registries import new_session

GRACE_MS = 200
LIMITS = JobLimits(
    deadline_ms=60_000,
    heartbeat_ms=30_000,
    retention_ms=60_000,
    handoff_grace_ms=GRACE_MS,
    handoff_attempts=3,
)
TENANT = "acme"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
AGENT = AgentConfig(TENANT, "agent-1", AgentKind.LLM, 1, model="m1")


async def start(registry: Backend, *, traceparent: str = TRACEPARENT, plan: bool = False) -> NewJob:
    new = NewJob(
        job_id=new_id(),
        session_id=await new_session(registry),
        agent_id="agent-1",
        service=Service.QUERY,
        kind=WorkKind.LLM_QUERY,
        content="hello",
        request_id="req-1",
        plan=plan_for(WorkKind.LLM_QUERY, AGENT, now_ms=1_000) if plan else None,
        agent=AGENT if plan else None,
        traceparent=traceparent,
    )
    started = await registry.jobs.start_job(TENANT, new, LIMITS, if_busy=IfBusy.RUN)
    assert isinstance(started, StartedJob)
    return new


def notice(job_id: str, event: NoticeEvent, sequence: int, tenant_id: str = TENANT) -> Notice:
    data = {"result": {"text": "hi"}} if event is NoticeEvent.COMPLETED else {"text": "h"}
    usage = TokenUsage(1, 1, 2) if event is NoticeEvent.COMPLETED else TokenUsage()
    return Notice(event, Service.QUERY, job_id, tenant_id, sequence, data=data, usage=usage)


async def claims_within(registry: Backend, seconds: float) -> list[HandoffClaim]:
    deadline = time.monotonic() + seconds
    while True:
        claims = await registry.jobs.claim_handoffs(LIMITS, limit=10)
        if claims or time.monotonic() >= deadline:
            return claims
        await asyncio.sleep(0.02)


async def test_a_job_keeps_the_trace_context_it_was_accepted_under(registry: Backend) -> None:
    new = await start(registry)
    job = await registry.jobs.get_job(TENANT, new.job_id)
    assert job is not None and job.traceparent == TRACEPARENT


async def test_a_job_accepted_without_a_trace_context_has_none(registry: Backend) -> None:
    new = await start(registry, traceparent="")
    job = await registry.jobs.get_job(TENANT, new.job_id)
    assert job is not None and job.traceparent == ""


async def test_a_finished_job_still_names_its_trace_context(registry: Backend) -> None:
    new = await start(registry)
    await registry.jobs.apply_notice(notice(new.job_id, NoticeEvent.COMPLETED, 1), LIMITS)
    job = await registry.jobs.get_job(TENANT, new.job_id)
    assert job is not None and job.state.is_final and job.traceparent == TRACEPARENT


async def test_a_hand_off_claim_carries_the_jobs_trace_context(registry: Backend) -> None:
    new = await start(registry)
    (claim,) = await claims_within(registry, 3.0)
    assert claim.job.job_id == new.job_id
    assert claim.job.traceparent == TRACEPARENT


async def test_an_accepted_notice_names_its_jobs_trace_context(registry: Backend) -> None:
    new = await start(registry)
    outcome = await registry.jobs.apply_notice(notice(new.job_id, NoticeEvent.DELTA, 1), LIMITS)
    assert outcome.verdict is Verdict.ACCEPTED
    assert outcome.traceparent == TRACEPARENT
    final = await registry.jobs.apply_notice(notice(new.job_id, NoticeEvent.COMPLETED, 2), LIMITS)
    assert (final.verdict, final.traceparent) == (Verdict.ACCEPTED, TRACEPARENT)


async def test_a_rejected_notice_names_no_trace_context(registry: Backend) -> None:
    new = await start(registry)
    await registry.jobs.apply_notice(notice(new.job_id, NoticeEvent.DELTA, 1), LIMITS)
    duplicate = await registry.jobs.apply_notice(notice(new.job_id, NoticeEvent.DELTA, 1), LIMITS)
    other = await registry.jobs.apply_notice(
        notice(new.job_id, NoticeEvent.DELTA, 2, tenant_id="other"), LIMITS
    )
    assert (duplicate.verdict, duplicate.traceparent) == (Verdict.DUPLICATE, "")
    assert (other.verdict, other.traceparent) == (Verdict.WRONG_TENANT, "")


async def test_the_finalize_of_a_finishing_job_carries_its_trace_context(
    registry: Backend,
) -> None:
    new = await start(registry, plan=True)
    outcome = await registry.jobs.apply_notice(notice(new.job_id, NoticeEvent.COMPLETED, 1), LIMITS)
    assert outcome.finishing is not None
    assert outcome.traceparent == TRACEPARENT
    assert outcome.finishing.job.traceparent == TRACEPARENT
    # ... and so does the claim of another process once its lease ran out.
    (claim,) = await claims_within(registry, 3.0)
    assert claim.finalize and claim.job == outcome.finishing.job
    assert claim.job.traceparent == TRACEPARENT

"""The JobStore's FINISHING state and plan records on both backends: a job whose plan appends
history turns FINISHING on its service's completed notice (result and usage stored, usage
charged, a finalize lease held for the process that applied the notice, no event), completes
with the stored result, is claimed for its finalize once its lease runs out (and fails
step_failed naming append_history after the last attempt); plan steps are recorded with their
events and the pre-steps' outputs in one step."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from domain.agents import AgentConfig, AgentKind
from domain.ids import new_id
from domain.jobs import (
    EventDraft,
    EventKind,
    FinishOutcome,
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
from domain.models import Service, TokenUsage, WorkKind
from domain.plans import OrchestrationPlan, StepName, StepState, plan_for
from domain.ports.usage import day_number
from registry.backend import Backend
from tests.support.registries import new_session

GRACE_MS = 300
LIMITS = JobLimits(
    deadline_ms=60_000,
    heartbeat_ms=30_000,
    retention_ms=60_000,
    queue_timeout_ms=600_000,
    handoff_grace_ms=GRACE_MS,
    handoff_attempts=2,
)
TENANT = "acme"
AGENT = AgentConfig(TENANT, "agent-1", AgentKind.LLM, 7, model="m1", system_prompt="Be brief.")
RESULT = {"result": {"text": "Refunds take 5 days."}}
# A completed notice's stored result and event carry the job's usage as their last member.
STORED = {**RESULT, "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
USAGE = TokenUsage(3, 4, 7)


def planned_job(session_id: str, agent: AgentConfig | None = AGENT) -> NewJob:
    plan = plan_for(WorkKind.LLM_QUERY, agent, now_ms=1_000)
    return NewJob(
        job_id=new_id(),
        session_id=session_id,
        agent_id="agent-1",
        service=plan.run_service,
        kind=WorkKind.LLM_QUERY,
        content="How long do refunds take?",
        request_id="req-1",
        model="m1",
        plan=plan,
        agent=agent,
    )


async def start(registry: Backend, new: NewJob | None = None) -> StartedJob:
    new = new or planned_job(await new_session(registry))
    started = await registry.jobs.start_job(TENANT, new, LIMITS, if_busy=IfBusy.RUN)
    assert isinstance(started, StartedJob)
    return started


def completed(job_id: str, service: Service = Service.QUERY, sequence: int = 1) -> Notice:
    return Notice(
        NoticeEvent.COMPLETED, service, job_id, TENANT, sequence, "agent-1", RESULT, USAGE
    )


async def finishing(registry: Backend) -> tuple[NewJob, HandoffClaim]:
    started = await start(registry)
    job_id = started.job.job_id
    outcome = await registry.jobs.apply_notice(completed(job_id), LIMITS)
    assert outcome.verdict is Verdict.ACCEPTED and outcome.finishing is not None
    spec = planned_job(started.job.session_id)
    return replace(spec, job_id=job_id), outcome.finishing


async def claims_within(registry: Backend, seconds: float) -> list[HandoffClaim]:
    deadline = time.monotonic() + seconds
    while True:
        claims = await registry.jobs.claim_handoffs(LIMITS, limit=10)
        if claims or time.monotonic() >= deadline:
            return claims
        await asyncio.sleep(0.02)


async def test_the_plan_and_agent_are_stored_with_the_job(registry: Backend) -> None:
    started = await start(registry)
    job = await registry.jobs.get_job(TENANT, started.job.job_id)
    assert job is not None
    assert job.plan == plan_for(WorkKind.LLM_QUERY, AGENT, now_ms=1_000)
    assert job.agent == AGENT


async def test_a_completed_notice_makes_a_job_whose_plan_appends_history_finishing(
    registry: Backend,
) -> None:
    started = await start(registry)
    job_id, session_id = started.job.job_id, started.job.session_id
    outcome = await registry.jobs.apply_notice(completed(job_id), LIMITS)
    # No event yet: the client sees `completed` once the turns are appended.
    assert outcome.event is None
    claim = outcome.finishing
    assert claim is not None and claim.finalize and claim.attempt == 1
    assert claim.result == STORED
    assert claim.job.content == "How long do refunds take?"
    # The calls after the work need no agent snapshot: the claim does not carry it.
    assert claim.job.plan == started.job.plan and claim.job.agent is None
    job = await registry.jobs.get_job(TENANT, job_id)
    assert job is not None and job.state is JobState.FINISHING and job.usage == USAGE
    page = await registry.events.read_after(TENANT, session_id, 0, limit=10)
    assert [e.kind for e in page.events] == [EventKind.ACCEPTED]
    # Usage is charged now; the session still has the job in flight.
    today = day_number(job.updated_at_ms)
    [day] = await registry.usage.usage_days(TENANT, today - 1, today + 1)
    assert day.usage == USAGE
    session = await registry.sessions.get_session(TENANT, session_id, touch=False)
    assert session is not None and session.pending_job_ids == (job_id,)
    counts = await registry.jobs.count_unfinished()
    assert counts[JobState.FINISHING] == 1 and counts[JobState.RUNNING] == 0


async def test_later_notices_of_a_finishing_job_change_nothing(registry: Backend) -> None:
    _, claim = await finishing(registry)
    job_id = claim.job.job_id
    assert (await registry.jobs.apply_notice(completed(job_id), LIMITS)).verdict is (
        Verdict.DUPLICATE
    )
    late = completed(job_id, sequence=2)
    assert (await registry.jobs.apply_notice(late, LIMITS)).verdict is Verdict.JOB_FINISHED


async def test_a_job_without_history_to_append_completes_outright(registry: Backend) -> None:
    session_id = await new_session(registry)
    one_call = OrchestrationPlan(plan_for(WorkKind.EMBEDDING, None, now_ms=0).calls)
    started = await start(registry, replace(planned_job(session_id), plan=one_call))
    outcome = await registry.jobs.apply_notice(completed(started.job.job_id), LIMITS)
    assert outcome.finishing is None
    assert outcome.event is not None and outcome.event.kind is EventKind.COMPLETED


async def test_finishing_completes_with_the_stored_result(registry: Backend) -> None:
    _, claim = await finishing(registry)
    job_id, session_id = claim.job.job_id, claim.job.session_id
    draft = EventDraft(job_id, EventKind.COMPLETED, "req-1", {})
    outcome, event = await registry.jobs.finish_job(TENANT, job_id, draft, LIMITS)
    assert outcome is FinishOutcome.DONE
    assert event is not None and event.kind is EventKind.COMPLETED and dict(event.data) == STORED
    session = await registry.sessions.get_session(TENANT, session_id, touch=False)
    assert session is not None
    assert session.pending_job_ids == () and session.message_count == 2
    assert session.usage == USAGE
    # Done: never claimed for a finalize.
    assert await claims_within(registry, GRACE_MS / 1000 * 2) == []


async def test_a_finishing_job_whose_lease_ran_out_is_claimed_once_for_its_finalize(
    registry: Backend,
) -> None:
    spec, first = await finishing(registry)
    began = time.monotonic()
    (claim,) = await claims_within(registry, 3.0)
    assert time.monotonic() - began >= GRACE_MS / 1000 * 0.8
    assert claim == replace(first, attempt=2)
    assert claim.job.content == spec.content
    assert await registry.jobs.claim_handoffs(LIMITS, limit=10) == []


async def test_a_late_hand_off_confirmation_keeps_the_finalize_lease(registry: Backend) -> None:
    _, first = await finishing(registry)
    await registry.jobs.handoffs_done([(TENANT, first.job.job_id)])
    (claim,) = await claims_within(registry, 3.0)
    assert claim.finalize and claim.job.job_id == first.job.job_id


async def test_a_renewed_finalize_lease_is_not_claimed(registry: Backend) -> None:
    _, first = await finishing(registry)
    for _ in range(3):
        await asyncio.sleep(GRACE_MS / 2000)
        assert await registry.jobs.renew_handoff(TENANT, first.job.job_id, LIMITS)
        assert await registry.jobs.claim_handoffs(LIMITS, limit=10) == []


async def test_after_the_last_finalize_the_job_fails_naming_append_history(
    registry: Backend,
) -> None:
    _, first = await finishing(registry)
    await claims_within(registry, 3.0)  # attempt 2 of 2
    (last,) = await claims_within(registry, 3.0)
    assert last.exhausted and last.finalize
    job = await registry.jobs.get_job(TENANT, first.job.job_id)
    assert job is not None and job.state is JobState.FAILED
    page = await registry.events.read_after(TENANT, first.job.session_id, 0, limit=10)
    error = page.events[-1].data["error"]
    assert error["code"] == "step_failed"
    assert (error["step"], error["service"]) == ("append_history", "conversation")
    assert error["message"].startswith("append_history (conversation): ")


async def test_a_finishing_job_can_be_cancelled(registry: Backend) -> None:
    _, claim = await finishing(registry)
    draft = EventDraft(claim.job.job_id, EventKind.CANCELLED, "r", {"reason": "test"})
    outcome, event = await registry.jobs.finish_job(TENANT, claim.job.job_id, draft, LIMITS)
    assert outcome is FinishOutcome.DONE and event is not None
    assert event.kind is EventKind.CANCELLED
    assert (await registry.jobs.count_unfinished())[JobState.FINISHING] == 0


async def test_plan_steps_are_recorded_with_their_events_and_outputs(registry: Backend) -> None:
    started = await start(registry)
    job_id = started.job.job_id
    plan = started.job.plan
    assert plan is not None
    history = replace(plan.call(StepName.LOAD_HISTORY), state=StepState.DONE, attempts=1)
    run = replace(plan.call(StepName.RUN), state=StepState.RUNNING, attempts=1)
    plan = plan.with_call(history).with_call(run)
    outputs = {"history": [{"role": "user", "content": "hi"}]}
    events = await registry.jobs.record_plan(TENANT, job_id, plan, [history, run], outputs=outputs)
    assert events is not None
    assert [(e.kind, e.data["name"], e.data["state"]) for e in events] == [
        (EventKind.PLAN_STEP, "load_history", "done"),
        (EventKind.PLAN_STEP, "run", "running"),
    ]
    assert events[0].data["index"] == 1 and events[0].data["service"] == "conversation"
    assert events[1].sequence == events[0].sequence + 1
    job = await registry.jobs.get_job(TENANT, job_id)
    assert job is not None and job.plan == plan
    # Another tenant's call changes nothing.
    assert await registry.jobs.record_plan("globex", job_id, plan, [run]) is None
    # The outputs come with a later hand-off claim.
    (claim,) = await claims_within(registry, 3.0)
    assert claim.outputs == outputs and claim.job.plan == plan


async def test_a_finished_jobs_plan_is_not_recorded(registry: Backend) -> None:
    started = await start(registry)
    job_id = started.job.job_id
    draft = EventDraft(job_id, EventKind.CANCELLED, "r", {"reason": "test"})
    await registry.jobs.finish_job(TENANT, job_id, draft, LIMITS)
    plan = started.job.plan
    assert plan is not None
    assert await registry.jobs.record_plan(TENANT, job_id, plan, list(plan.calls)) is None

"""domain.job_machine: each transition of a job and its session as a pure function, one
behaviour per test (the stores' agreement is tests/registry/test_job_machine_differential.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from domain import job_machine
from domain.job_machine import JobRecord, SessionSide
from domain.jobs import (
    ActivateOutcome,
    EventDraft,
    EventKind,
    FinishOutcome,
    IfBusy,
    Job,
    JobLimits,
    JobState,
    NewJob,
    Notice,
    NoticeEvent,
    SessionEvent,
    StartRefused,
    Verdict,
)
from domain.models import Service, Session, SessionState, TokenUsage, WorkKind

NOW = 1_000_000
LIMITS = JobLimits(
    deadline_ms=60_000,
    heartbeat_ms=30_000,
    retention_ms=90_000,
    queue_timeout_ms=120_000,
    handoff_grace_ms=5_000,
    handoff_attempts=3,
)
TENANT = "acme"


def session(*pending: str, state: SessionState = SessionState.ACTIVE) -> Session:
    return Session(
        "s1",
        TENANT,
        "agent-1",
        "",
        state,
        {},
        created_at_ms=0,
        updated_at_ms=0,
        expires_at_ms=NOW + 600_000,
        ttl_ms=600_000,
        pending_job_ids=tuple(pending),
    )


def new_job(job_id: str = "j1", *, keep_final: bool = False) -> NewJob:
    return NewJob(
        job_id,
        "s1",
        "agent-1",
        Service.QUERY,
        WorkKind.LLM_QUERY,
        "hi",
        "r1",
        keep_final=keep_final,
    )


def started(
    job_id: str = "j1",
    side: SessionSide | None = None,
    *,
    hold: bool = False,
    keep_final: bool = False,
    if_busy: IfBusy = IfBusy.HOLD,
) -> tuple[JobRecord, SessionSide]:
    """A job just started (and its accepted event appended as sequence 1)."""
    side = side or SessionSide(session())
    step = job_machine.start(
        None,
        side,
        TENANT,
        new_job(job_id, keep_final=keep_final),
        LIMITS,
        if_busy=if_busy,
        hold=hold,
        now=NOW,
    )
    effects = step.effects
    assert effects.record is not None and effects.side is not None and effects.event
    event = appended_event(effects.event, 1, NOW)
    return job_machine.appended(effects.record, event), effects.side


def appended_event(draft: EventDraft, sequence: int, time_ms: int) -> SessionEvent:
    return SessionEvent(
        "s1", draft.job_id, sequence, time_ms, draft.kind, draft.request_id, draft.data
    )


def notice(event: NoticeEvent, sequence: int = 0, **changes: object) -> Notice:
    base = Notice(event, Service.QUERY, "j1", TENANT, sequence)
    return replace(base, **changes)  # type: ignore[arg-type]


def test_a_start_on_an_idle_session_records_a_pending_job_and_makes_the_session_busy() -> None:
    record, side = started()
    assert record.job.state is JobState.PENDING
    assert side.session is not None
    assert side.session.state is SessionState.BUSY
    assert side.session.pending_job_ids == ("j1",)
    assert side.session.message_count == 1


def test_the_accepted_event_carries_the_first_deadline() -> None:
    step = job_machine.start(
        None,
        SessionSide(session()),
        TENANT,
        new_job(),
        LIMITS,
        if_busy=IfBusy.RUN,
        hold=False,
        now=NOW,
    )
    assert step.effects.event is not None
    assert step.effects.event.kind is EventKind.ACCEPTED
    assert step.effects.event.data["deadline_ms"] == NOW + LIMITS.heartbeat_ms
    assert "queued" not in step.effects.event.data


def test_a_start_with_an_existing_record_is_refused_and_changes_nothing() -> None:
    record, side = started()
    step = job_machine.start(
        record, side, TENANT, new_job(), LIMITS, if_busy=IfBusy.RUN, hold=False, now=NOW
    )
    assert step.outcome is StartRefused.JOB_EXISTS
    assert step.effects == job_machine.NO_EFFECTS


def test_a_start_on_a_missing_session_is_refused() -> None:
    step = job_machine.start(
        None, SessionSide(None), TENANT, new_job(), LIMITS, if_busy=IfBusy.RUN, hold=False, now=NOW
    )
    assert step.outcome is StartRefused.SESSION_MISSING


def test_a_start_on_a_session_past_its_expiry_is_refused() -> None:
    side = SessionSide(replace(session(), expires_at_ms=NOW))
    step = job_machine.start(
        None, side, TENANT, new_job(), LIMITS, if_busy=IfBusy.RUN, hold=False, now=NOW
    )
    assert step.outcome is StartRefused.SESSION_NOT_OPEN


def test_reject_refuses_a_start_on_a_busy_session() -> None:
    side = SessionSide(session("j0", state=SessionState.BUSY))
    step = job_machine.start(
        None, side, TENANT, new_job(), LIMITS, if_busy=IfBusy.REJECT, hold=False, now=NOW
    )
    assert step.outcome is StartRefused.SESSION_BUSY


def test_run_starts_a_pending_job_beside_the_ones_in_flight() -> None:
    side = SessionSide(session("j0", state=SessionState.BUSY))
    step = job_machine.start(
        None, side, TENANT, new_job(), LIMITS, if_busy=IfBusy.RUN, hold=False, now=NOW
    )
    assert isinstance(step.outcome, Job)
    assert step.outcome.state is JobState.PENDING
    assert step.effects.side is not None and step.effects.side.line == ()


def test_hold_on_a_busy_session_queues_the_job_at_the_back_of_the_line() -> None:
    side = SessionSide(session("j0", "q0", state=SessionState.BUSY), ("q0",))
    record, new_side = started(side=side)
    assert record.job.state is JobState.QUEUED
    assert record.job.deadline_ms == NOW + LIMITS.queue_timeout_ms
    assert new_side.line == ("q0", "j1")


def test_a_queued_jobs_enqueue_carries_its_accepted_sequence() -> None:
    record, _ = started(hold=True)
    assert record.handoff is not None
    assert record.handoff.enqueue_sequence == 1
    assert record.handoff.leased(record.job.state)


def test_activate_starts_the_first_in_line_when_nothing_else_is_in_flight() -> None:
    record, side = started(hold=True)
    step = job_machine.activate(record, side, TENANT, LIMITS, now=NOW + 10)
    assert step.outcome is ActivateOutcome.STARTED
    assert step.effects.record is not None
    assert step.effects.record.job.state is JobState.PENDING
    assert step.effects.record.job.deadline_ms == NOW + 10 + LIMITS.deadline_ms
    assert step.effects.side is not None and step.effects.side.line == ()


def test_activate_waits_while_a_job_accepted_before_is_in_flight() -> None:
    side = SessionSide(session("j0", state=SessionState.BUSY))
    record, side = started(side=side)
    step = job_machine.activate(record, side, TENANT, LIMITS, now=NOW)
    assert step.outcome is ActivateOutcome.WAIT
    assert step.effects.record is not None and step.effects.record.handoff is not None
    assert step.effects.record.handoff.enqueue_sequence is None  # its item was delivered


def test_activate_of_another_tenants_job_finds_no_job() -> None:
    record, side = started(hold=True)
    step = job_machine.activate(record, side, "other", LIMITS, now=NOW)
    assert step.outcome is ActivateOutcome.UNKNOWN_JOB


def test_activate_on_a_closed_session_says_so() -> None:
    record, side = started(hold=True)
    assert side.session is not None
    closed = SessionSide(replace(side.session, state=SessionState.CLOSED), side.line)
    step = job_machine.activate(record, closed, TENANT, LIMITS, now=NOW)
    assert step.outcome is ActivateOutcome.SESSION_NOT_OPEN


def test_a_progress_notice_makes_the_job_running_and_moves_its_heartbeat() -> None:
    record, side = started()
    step = job_machine.apply_notice(
        record, side, notice(NoticeEvent.PROGRESS, 1), LIMITS, now=NOW + 5
    )
    assert step.outcome is Verdict.ACCEPTED
    assert step.effects.record is not None
    job = step.effects.record.job
    assert (job.state, job.last_notice_sequence) == (JobState.RUNNING, 1)
    assert job.heartbeat_deadline_ms == NOW + 5 + LIMITS.heartbeat_ms
    assert step.effects.record.handoff is None  # the service has it


@pytest.mark.parametrize(
    ("event", "data", "kind"),
    [
        (NoticeEvent.TOOL_CALL, {"call_id": "c1", "phase": "started"}, EventKind.TOOL_CALL),
        (NoticeEvent.STEP, {"step_id": "s", "phase": "finished"}, EventKind.WORKFLOW_STEP),
    ],
)
def test_tool_calls_and_workflow_steps_apply_like_progress(
    event: NoticeEvent, data: dict[str, str], kind: EventKind
) -> None:
    record, side = started()
    step = job_machine.apply_notice(record, side, notice(event, 1, data=data), LIMITS, now=NOW + 7)
    assert step.outcome is Verdict.ACCEPTED
    effects = step.effects
    assert effects.record is not None and effects.event is not None
    job = effects.record.job
    assert (job.state, job.last_notice_sequence) == (JobState.RUNNING, 1)
    assert job.heartbeat_deadline_ms == NOW + 7 + LIMITS.heartbeat_ms
    assert effects.record.handoff is None
    assert (effects.event.kind, effects.event.data) == (kind, data)
    assert effects.side is None and effects.charge is None  # the job goes on


def test_a_notice_at_or_below_the_last_sequence_is_a_duplicate() -> None:
    record, side = started()
    record = replace(record, job=replace(record.job, last_notice_sequence=3))
    step = job_machine.apply_notice(record, side, notice(NoticeEvent.DELTA, 3), LIMITS, now=NOW)
    assert step.outcome is Verdict.DUPLICATE
    assert step.effects == job_machine.NO_EFFECTS


def test_an_unnumbered_notice_follows_the_last_sequence() -> None:
    record, side = started()
    record = replace(record, job=replace(record.job, last_notice_sequence=3))
    step = job_machine.apply_notice(record, side, notice(NoticeEvent.DELTA, 0), LIMITS, now=NOW)
    assert step.effects.record is not None
    assert step.effects.record.job.last_notice_sequence == 4


def test_a_notice_from_another_tenant_is_wrong_tenant() -> None:
    record, side = started()
    step = job_machine.apply_notice(
        record, side, notice(NoticeEvent.DELTA, tenant_id="other"), LIMITS, now=NOW
    )
    assert step.outcome is Verdict.WRONG_TENANT


def test_a_notice_from_another_service_is_wrong_service() -> None:
    record, side = started()
    step = job_machine.apply_notice(
        record, side, notice(NoticeEvent.DELTA, service=Service.EMBEDDING), LIMITS, now=NOW
    )
    assert step.outcome is Verdict.WRONG_SERVICE


def test_a_notice_about_a_queued_job_finds_no_job() -> None:
    record, side = started(hold=True)
    step = job_machine.apply_notice(record, side, notice(NoticeEvent.DELTA), LIMITS, now=NOW)
    assert step.outcome is Verdict.UNKNOWN_JOB


def test_a_new_notice_about_a_finished_job_is_job_finished() -> None:
    record, side = started()
    record = replace(record, job=replace(record.job, state=JobState.CANCELLED))
    step = job_machine.apply_notice(record, side, notice(NoticeEvent.DELTA, 1), LIMITS, now=NOW)
    assert step.outcome is Verdict.JOB_FINISHED


def test_a_completed_notice_counts_tokens_for_session_and_tenant_and_frees_the_session() -> None:
    record, side = started()
    usage = TokenUsage(2, 3, 5)
    step = job_machine.apply_notice(
        record, side, notice(NoticeEvent.COMPLETED, 1, usage=usage), LIMITS, now=NOW + 7
    )
    effects = step.effects
    assert effects.side is not None and effects.side.session is not None
    assert effects.side.session.state is SessionState.ACTIVE
    assert effects.side.session.pending_job_ids == ()
    assert effects.side.session.message_count == 2
    assert effects.side.session.usage == usage
    assert effects.charge == job_machine.UsageCharge(TENANT, "agent-1", usage)
    assert effects.record is not None
    assert effects.record.expires_at_ms == NOW + 7 + LIMITS.retention_ms


def test_a_failed_notice_counts_no_message_and_no_tokens() -> None:
    record, side = started()
    step = job_machine.apply_notice(
        record, side, notice(NoticeEvent.FAILED, 1, usage=TokenUsage(1, 1, 2)), LIMITS, now=NOW
    )
    assert step.effects.side is not None and step.effects.side.session is not None
    assert step.effects.side.session.message_count == 1
    assert step.effects.charge is None


def test_a_session_with_another_job_in_flight_stays_busy_when_one_ends() -> None:
    busy = SessionSide(session("j0", state=SessionState.BUSY))
    record, side = started(side=busy, if_busy=IfBusy.RUN)
    step = job_machine.apply_notice(record, side, notice(NoticeEvent.FAILED, 1), LIMITS, now=NOW)
    assert step.effects.side is not None and step.effects.side.session is not None
    assert step.effects.side.session.state is SessionState.BUSY
    assert step.effects.side.session.pending_job_ids == ("j0",)


def test_cancelling_a_queued_job_takes_it_out_of_the_line() -> None:
    side = SessionSide(session("j0", state=SessionState.BUSY))
    record, side = started(side=side)
    draft = EventDraft("j1", EventKind.CANCELLED, "r1", {"reason": "x"})
    step = job_machine.finish(record, side, TENANT, draft, LIMITS, now=NOW)
    assert step.outcome is FinishOutcome.DONE
    assert step.effects.side is not None and step.effects.side.line == ()
    assert step.effects.event is not None and step.effects.event.request_id == "r1"


def test_finishing_a_final_job_is_already_final() -> None:
    record, side = started()
    record = replace(record, job=replace(record.job, state=JobState.COMPLETED))
    draft = EventDraft("j1", EventKind.CANCELLED, "", {})
    step = job_machine.finish(record, side, TENANT, draft, LIMITS, now=NOW)
    assert step.outcome is FinishOutcome.ALREADY_FINAL


def test_a_kept_job_keeps_its_final_event_once_appended() -> None:
    record, side = started(keep_final=True)
    draft = EventDraft("j1", EventKind.CANCELLED, "r1", {})
    step = job_machine.finish(record, side, TENANT, draft, LIMITS, now=NOW)
    assert step.effects.record is not None and step.effects.event is not None
    event = appended_event(step.effects.event, 2, NOW)
    assert job_machine.appended(step.effects.record, event).job.final_event == event


def test_the_reaper_times_out_a_job_past_its_heartbeat_deadline() -> None:
    record, side = started()
    due = NOW + LIMITS.heartbeat_ms
    step = job_machine.reap(record, side, LIMITS, now=due)
    assert step.outcome is True
    assert step.effects.event is not None
    assert step.effects.event.kind is EventKind.TIMED_OUT
    assert step.effects.event.data == {"deadline_ms": due}


def test_the_reaper_looks_again_at_a_job_whose_heartbeat_moved() -> None:
    record, side = started()
    step = job_machine.reap(record, side, LIMITS, now=NOW + 1)
    assert step.outcome is False
    assert step.effects == job_machine.Effects(look_at_ms=NOW + LIMITS.heartbeat_ms)


def test_a_hand_off_is_claimed_only_after_its_lease() -> None:
    record, side = started()
    early = job_machine.claim_handoff(record, side, LIMITS, now=NOW + LIMITS.handoff_grace_ms - 1)
    assert early.outcome is None
    late = job_machine.claim_handoff(record, side, LIMITS, now=NOW + LIMITS.handoff_grace_ms)
    assert late.outcome is not None
    assert (late.outcome.attempt, late.outcome.exhausted) == (2, False)


def test_a_queued_jobs_unconfirmed_enqueue_is_claimed_as_a_requeue() -> None:
    record, side = started(hold=True)
    step = job_machine.claim_handoff(record, side, LIMITS, now=NOW + LIMITS.handoff_grace_ms)
    assert step.outcome is not None
    assert (step.outcome.requeue, step.outcome.accepted_sequence) == (True, 1)


def test_a_confirmed_enqueue_is_not_claimed() -> None:
    record, side = started(hold=True)
    done = job_machine.enqueue_done(record, TENANT).effects.record
    assert done is not None
    step = job_machine.claim_handoff(done, side, LIMITS, now=NOW + LIMITS.handoff_grace_ms)
    assert step.outcome is None


def test_the_claim_after_the_last_attempt_fails_the_job_in_the_same_step() -> None:
    record, side = started()
    assert record.handoff is not None
    record = replace(record, handoff=replace(record.handoff, attempts=LIMITS.handoff_attempts))
    step = job_machine.claim_handoff(record, side, LIMITS, now=NOW + LIMITS.handoff_grace_ms)
    assert step.outcome is not None and step.outcome.exhausted
    assert step.effects.event is not None
    assert step.effects.event.kind is EventKind.FAILED
    assert step.effects.event.data["error"]["code"] == "handoff_failed"


def test_a_renewal_moves_the_lease_of_a_hand_off_in_progress() -> None:
    record, _ = started()
    step = job_machine.renew_handoff(record, TENANT, LIMITS, now=NOW + 100)
    assert step.outcome is True
    assert step.effects.record is not None and step.effects.record.handoff is not None
    assert step.effects.record.handoff.lease_ms == NOW + 100 + LIMITS.handoff_grace_ms


def test_a_hand_off_done_leaves_nothing_to_renew() -> None:
    record, _ = started()
    done = job_machine.handoff_done(record, TENANT).effects.record
    assert done is not None and done.handoff is None
    assert job_machine.renew_handoff(done, TENANT, LIMITS, now=NOW).outcome is False

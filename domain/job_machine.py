"""The job state machine, once: every change to a job and its session's bookkeeping as a pure
function of (the job's record, its session's side, the input, now) -> a Step (the outcome and
the effects to store). No I/O: the memory store applies the effects (registry.memory_jobs);
the Redis store's Lua scripts (registry/lua/jobs/) make the same transitions atomically
on Redis, and tests/registry/test_job_machine_differential.py checks the two agree.

    [queued ->] pending -> running [-> finishing] -> completed | failed | timed_out | cancelled

A job's record carries its work spec from its start until it ended, and its hand-off lease
until the service took it. A job whose plan appends history turns FINISHING on its completed
notice (result and usage stored, usage charged, a finalize lease taken, no event yet) and is
completed (``finish``) with the stored result once the turns are appended; a FINISHING job
whose finalize lease ran out is claimed like a hand-off. A store appends the Step's event to
the session's log, then passes the stored event to ``appended`` (a queued job remembers its
accepted event's sequence for its enqueue; a job kept final keeps its final event).

A job that would turn PENDING (``start``, ``activate``) is first checked against its tenant's
limits toward the services (``limits.caps``, domain.service_caps) with the store's reading of
the tenant's jobs in flight at the service and tokens of the minute (``CapReading``): over one,
the outcome is LimitReached and nothing is recorded (an activation leaves the job QUEUED).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from domain.jobs import (
    ActivateOutcome,
    EventDraft,
    EventKind,
    FinishOutcome,
    HandoffClaim,
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
    finalize_failed_data,
    handoff_failed_data,
    with_usage,
)
from domain.models import Session, SessionState, TokenUsage
from domain.plans import OrchestrationPlan, ServiceCall
from domain.service_caps import LimitReached, check

Outcome = TypeVar("Outcome")


@dataclass(frozen=True, slots=True)
class Handoff:
    """A job's work spec until it is handed over, and its hand-off lease: ``lease_ms`` (a job
    not confirmed by then is claimed by any process) and ``attempts`` (hand-offs started). A
    QUEUED job's first hand-off is its enqueue on the work queue: until that is confirmed
    ``enqueue_sequence`` holds its accepted event's sequence (which the work item carries)."""

    spec: NewJob
    lease_ms: int
    attempts: int = 1
    enqueue_sequence: int | None = None

    def leased(self, state: JobState) -> bool:
        """Whether a hand-off (or an enqueue) of a job in ``state`` is in progress."""
        return state is JobState.PENDING or (
            state is JobState.QUEUED and self.enqueue_sequence is not None
        )


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job as a store keeps it: the job, when the record is dropped, and its hand-off. Until
    the job ends it also keeps its work spec (``spec``: the finalize needs the user's text),
    what its plan's pre-steps recorded for the run (``outputs``) and, once FINISHING, the
    completed notice's data (``result``) and the finalize lease (``finalize``)."""

    job: Job
    expires_at_ms: int
    handoff: Handoff | None = None
    spec: NewJob | None = None
    outputs: Mapping[str, Any] | None = None
    result: Mapping[str, Any] | None = None
    finalize: Handoff | None = None


@dataclass(frozen=True, slots=True)
class SessionSide:
    """What the machine reads and changes of a job's session: the session (None when it is
    gone) and its line, the ids of its QUEUED jobs, oldest first."""

    session: Session | None
    line: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ParentSide:
    """What the machine reads of an internal call's parent job: its record and its session
    (None when gone)."""

    record: JobRecord | None
    session: Session | None = None


def parent_in_flight(parent: JobRecord | None, tenant_id: str) -> bool:
    """Whether an internal call may start for (or roll its tokens up into) ``parent``: a job
    of the tenant, handed to its service or about to be (PENDING or RUNNING)."""
    return (
        parent is not None
        and parent.job.tenant_id == tenant_id
        and parent.job.state in (JobState.PENDING, JobState.RUNNING)
    )


@dataclass(frozen=True, slots=True)
class CapReading:
    """What the limits toward the services (domain.service_caps) are checked against when a
    job would start: the tenant's jobs in flight at the job's service (PENDING or RUNNING,
    records not expired) and the tokens charged to the tenant this minute."""

    in_flight: int = 0
    minute_tokens: int = 0


@dataclass(frozen=True, slots=True)
class UsageCharge:
    """Tokens of a completed job, added to its tenant's usage of the day (and its agent's)."""

    tenant_id: str
    agent_id: str
    usage: TokenUsage


@dataclass(frozen=True, slots=True)
class Effects:
    """What a transition changes; None: unchanged (nothing to append, add or schedule)."""

    # The job's new record: its state, expiry and hand-off (None there: handed over or ended).
    record: JobRecord | None = None
    # Its session's new state and line.
    side: SessionSide | None = None
    # The event to append to the session's log...
    event: EventDraft | None = None
    # ...and more after it (plan steps recorded together).
    events: tuple[EventDraft, ...] = ()
    # Usage to add to the tenant's day.
    charge: UsageCharge | None = None
    # When the reaper should look at the job (the deadline index is only a hint).
    look_at_ms: int | None = None
    # An internal call's parent job (domain.internal_calls), changed with it: its count of
    # calls (start), or its usage and its session's (a child's completion rolled up).
    parent: JobRecord | None = None
    parent_session: Session | None = None


NO_EFFECTS = Effects()


@dataclass(frozen=True, slots=True)
class Step(Generic[Outcome]):
    outcome: Outcome
    effects: Effects = NO_EFFECTS


def _open(session: Session | None, now: int) -> bool:
    return session is not None and session.state.is_open and now < session.expires_at_ms


def _due(job: Job) -> int:
    return min(job.deadline_ms, job.heartbeat_deadline_ms)


def start(
    existing: JobRecord | None,
    side: SessionSide,
    tenant_id: str,
    new: NewJob,
    limits: JobLimits,
    *,
    if_busy: IfBusy,
    hold: bool,
    now: int,
    parent: JobRecord | None = None,
    reading: CapReading = CapReading(),
) -> Step[Job | StartRefused | LimitReached]:
    """Record a new job for its session: PENDING, or QUEUED at the back of the session's line
    when ``hold`` or the session is busy and ``if_busy`` holds; the session turns BUSY and
    counts the message; an ``accepted`` event. An internal call's job (``new.parent_job_id``,
    ``parent`` its record) starts only while its parent is in flight and has calls left; the
    parent counts it. A job that would be PENDING while its tenant is at a limit toward its
    service (``limits.caps``, checked against ``reading``) is not recorded: LimitReached."""
    if existing is not None:
        return Step(StartRefused.JOB_EXISTS)
    counted: JobRecord | None = None
    if new.parent_job_id:
        if parent is None or not parent_in_flight(parent, tenant_id):
            return Step(StartRefused.PARENT_NOT_IN_FLIGHT)
        if len(parent.job.internal_call_ids) >= limits.max_internal_calls:
            return Step(StartRefused.CALL_LIMIT)
        calls = (*parent.job.internal_call_ids, new.job_id)
        counted = replace(parent, job=replace(parent.job, internal_call_ids=calls))
    session = side.session
    if session is None:
        return Step(StartRefused.SESSION_MISSING)
    if not _open(session, now):
        return Step(StartRefused.SESSION_NOT_OPEN)
    busy = bool(session.pending_job_ids)
    if if_busy is IfBusy.REJECT and busy:
        return Step(StartRefused.SESSION_BUSY)
    queued = hold or (if_busy is IfBusy.HOLD and busy)
    if not queued:
        reached = _over_limit(tenant_id, new, limits, reading, now)
        if reached is not None:
            return Step(reached)
    job = new.recorded(tenant_id, now, limits, queued=queued)
    lifetime = limits.queue_timeout_ms + limits.deadline_ms if queued else limits.deadline_ms
    handoff = Handoff(new, lease_ms=now + limits.handoff_grace_ms)
    record = JobRecord(job, now + lifetime + limits.retention_ms, handoff, spec=new)
    session = replace(
        session,
        state=SessionState.BUSY,
        updated_at_ms=now,
        message_count=session.message_count + 1,
        pending_job_ids=tuple(sorted((*session.pending_job_ids, new.job_id))),
    )
    data: dict[str, Any] = {
        "service": new.service.value,
        "kind": new.kind.value,
        "content": new.content,
        "model": new.model,
        "deadline_ms": _due(job),
    }
    if queued:
        data["queued"] = True
    effects = Effects(
        record=record,
        side=SessionSide(session, (*side.line, new.job_id) if queued else side.line),
        event=EventDraft(new.job_id, EventKind.ACCEPTED, new.request_id, data),
        look_at_ms=_due(job),
        parent=counted,
    )
    return Step(job, effects)


def _over_limit(
    tenant_id: str, job: NewJob | Job, limits: JobLimits, reading: CapReading, now: int
) -> LimitReached | None:
    return check(
        limits.caps,
        tenant_id,
        job.service,
        in_flight=reading.in_flight,
        minute_tokens=reading.minute_tokens,
        now_ms=now,
    )


def appended(record: JobRecord, event: SessionEvent) -> JobRecord:
    """The record once ``event`` (its transition's) is in the log: a QUEUED job's accepted
    event starts its enqueue (its first hand-off), a final one is kept when asked."""
    handoff = record.handoff
    if event.kind is EventKind.ACCEPTED and record.job.state is JobState.QUEUED and handoff:
        return replace(record, handoff=replace(handoff, enqueue_sequence=event.sequence))
    if event.kind.is_final and record.job.keep_final:
        return replace(record, job=replace(record.job, final_event=event))
    return record


def activate(
    record: JobRecord | None,
    side: SessionSide,
    tenant_id: str,
    limits: JobLimits,
    *,
    now: int,
    reading: CapReading = CapReading(),
) -> Step[ActivateOutcome | LimitReached]:
    """A QUEUED job's work item was delivered (its enqueue is confirmed): it turns PENDING when
    it is first in its session's line, no job accepted before it is still in flight and its
    tenant is under the limits toward its service (else LimitReached: it stays QUEUED)."""
    if record is None or record.job.tenant_id != tenant_id:
        return Step(ActivateOutcome.UNKNOWN_JOB)
    job = record.job
    if job.state in (JobState.PENDING, JobState.RUNNING, JobState.FINISHING):
        return Step(ActivateOutcome.ALREADY_STARTED)
    if job.state.is_final:
        return Step(ActivateOutcome.FINAL)
    handoff = record.handoff
    if handoff is not None and handoff.enqueue_sequence is not None:
        handoff = replace(handoff, enqueue_sequence=None)
        record = replace(record, handoff=handoff)
    confirmed = Effects(record=record)
    session = side.session
    if not _open(session, now):
        return Step(ActivateOutcome.SESSION_NOT_OPEN, confirmed)
    assert session is not None
    line = side.line
    if not line or line[0] != job.job_id or len(session.pending_job_ids) > len(line):
        return Step(ActivateOutcome.WAIT, confirmed)
    reached = _over_limit(tenant_id, job, limits, reading, now)
    if reached is not None:
        return Step(reached, confirmed)
    job = replace(
        job,
        state=JobState.PENDING,
        updated_at_ms=now,
        deadline_ms=now + limits.deadline_ms,
        heartbeat_deadline_ms=now + limits.heartbeat_ms,
    )
    # Its hand-off to its service starts now (whatever became of its enqueue's record).
    spec = handoff.spec if handoff is not None else record.spec
    if spec is not None:
        handoff = Handoff(spec, lease_ms=now + limits.handoff_grace_ms)
    expires = now + limits.deadline_ms + limits.retention_ms
    started = replace(record, job=job, expires_at_ms=expires, handoff=handoff)
    effects = Effects(record=started, side=SessionSide(session, line[1:]), look_at_ms=_due(job))
    return Step(ActivateOutcome.STARTED, effects)


def renew_handoff(
    record: JobRecord | None, tenant_id: str, limits: JobLimits, *, now: int
) -> Step[bool]:
    """Extend the lease of a hand-off in progress; False when there is none to extend (handed
    over, enqueued, ended or gone)."""
    if record is None or record.job.tenant_id != tenant_id:
        return Step(False)
    finalize = record.finalize
    if record.job.state is JobState.FINISHING and finalize is not None:
        finalize = replace(finalize, lease_ms=now + limits.handoff_grace_ms)
        return Step(True, Effects(record=replace(record, finalize=finalize)))
    handoff = record.handoff
    if handoff is None or not handoff.leased(record.job.state):
        return Step(False)
    handoff = replace(handoff, lease_ms=now + limits.handoff_grace_ms)
    return Step(True, Effects(record=replace(record, handoff=handoff)))


def enqueue_done(record: JobRecord | None, tenant_id: str) -> Step[None]:
    """A QUEUED job's work item is on the work queue: its enqueue needs no redo."""
    if record is None or record.job.tenant_id != tenant_id or record.handoff is None:
        return Step(None)
    handoff = replace(record.handoff, enqueue_sequence=None)
    return Step(None, Effects(record=replace(record, handoff=handoff)))


def handoff_done(record: JobRecord | None, tenant_id: str) -> Step[None]:
    """The service took the job: its work spec and lease go."""
    if record is None or record.job.tenant_id != tenant_id or record.handoff is None:
        return Step(None)
    return Step(None, Effects(record=replace(record, handoff=None)))


def claim_handoff(
    record: JobRecord, side: SessionSide, limits: JobLimits, *, now: int
) -> Step[HandoffClaim | None]:
    """Claim a job whose hand-off (or enqueue, or finalize) lease ran out: a new lease and one
    more attempt, or, with every attempt used or past its deadline, the job fails in this same
    step (``handoff_failed``; a finalize: ``step_failed`` naming append_history). None:
    nothing to claim (handed over, enqueued and waiting, or leased)."""
    handoff, job = record.handoff, record.job
    if job.state is JobState.FINISHING:
        return _claim_finalize(record, side, limits, now=now)
    if handoff is None or not handoff.leased(job.state) or now < handoff.lease_ms:
        return Step(None)
    requeue = handoff.enqueue_sequence
    claim = HandoffClaim(
        job.tenant_id,
        replace(handoff.spec, plan=job.plan),
        handoff.attempts,
        requeue=requeue is not None,
        accepted_sequence=requeue or 0,
        outputs=record.outputs,
        deadline_ms=job.deadline_ms,
    )
    if handoff.attempts >= limits.handoff_attempts or now >= job.deadline_ms:
        data = handoff_failed_data(job.service.value, handoff.attempts)
        effects = _finished(record, side, JobState.FAILED, data, limits, now=now)
        return Step(replace(claim, exhausted=True), effects)
    attempts = handoff.attempts + 1
    handoff = replace(handoff, lease_ms=now + limits.handoff_grace_ms, attempts=attempts)
    return Step(replace(claim, attempt=attempts), Effects(record=replace(record, handoff=handoff)))


def _claim_finalize(
    record: JobRecord, side: SessionSide, limits: JobLimits, *, now: int
) -> Step[HandoffClaim | None]:
    finalize, job = record.finalize, record.job
    if finalize is None or now < finalize.lease_ms:
        return Step(None)
    claim = finishing_claim(record, finalize.attempts)
    if finalize.attempts >= limits.handoff_attempts or now >= job.deadline_ms:
        data = finalize_failed_data(finalize.attempts)
        effects = _finished(record, side, JobState.FAILED, data, limits, now=now)
        return Step(replace(claim, exhausted=True), effects)
    attempts = finalize.attempts + 1
    finalize = replace(finalize, lease_ms=now + limits.handoff_grace_ms, attempts=attempts)
    effects = Effects(record=replace(record, finalize=finalize))
    return Step(replace(claim, attempt=attempts), effects)


def finishing_claim(record: JobRecord, attempt: int) -> HandoffClaim:
    """The finalize of a FINISHING job, as its claim (the notice that turned it FINISHING
    claims attempt 1 for the process that applied it). It carries no agent snapshot: the
    calls after the work need none."""
    job = record.job
    spec = record.spec
    assert spec is not None  # kept until the job ends
    return HandoffClaim(
        job.tenant_id,
        replace(spec, plan=job.plan, agent=None),
        attempt,
        finalize=True,
        result=record.result,
        deadline_ms=job.deadline_ms,
    )


def apply_notice(
    record: JobRecord | None,
    side: SessionSide,
    notice: Notice,
    limits: JobLimits,
    *,
    now: int,
    parent: ParentSide | None = None,
) -> Step[Verdict]:
    """A (validated) notice from a service: progress, deltas, tool calls and workflow steps make
    the job RUNNING and move its heartbeat deadline; completed and failed end it (a completed
    one counts its tokens for the session and the tenant). A completed notice on a job whose
    plan appends history makes it FINISHING instead (result and usage stored, tokens counted,
    a finalize lease, no event; see ``finishing_claim``). A duplicate or late notice changes
    nothing.

    A job's usage is its own tokens plus those of its internal calls rolled up so far: the
    completed event (or the stored result of a FINISHING job) reports that total, while the
    tenant and the session are charged the notice's own tokens (each call charged its own).
    The completed notice of an internal call (``parent``: its parent job) rolls its tokens up
    into the parent's usage and the parent's session while the parent is in flight."""
    if record is None:
        return Step(Verdict.UNKNOWN_JOB)
    job = record.job
    if job.tenant_id != notice.tenant_id:
        return Step(Verdict.WRONG_TENANT)
    if job.service is not notice.service:
        return Step(Verdict.WRONG_SERVICE)
    if job.state is JobState.QUEUED:  # not handed to any service yet
        return Step(Verdict.UNKNOWN_JOB)
    sequence = notice.sequence or job.last_notice_sequence + 1  # 0: unnumbered
    if sequence <= job.last_notice_sequence:
        return Step(Verdict.DUPLICATE)
    if job.state.is_final or job.state is JobState.FINISHING:
        return Step(Verdict.JOB_FINISHED)
    if notice.event.keeps_running:
        job = replace(
            job,
            state=JobState.RUNNING,
            last_notice_sequence=sequence,
            updated_at_ms=now,
            heartbeat_deadline_ms=now + limits.heartbeat_ms,
        )
        event = EventDraft(job.job_id, EventKind(notice.event.value), job.request_id, notice.data)
        # The service has it: the hand-off is over.
        return Step(
            Verdict.ACCEPTED, Effects(record=replace(record, job=job, handoff=None), event=event)
        )
    total = job.usage + notice.usage
    job = replace(job, last_notice_sequence=sequence, usage=total)
    completed = notice.event is NoticeEvent.COMPLETED
    data = with_usage(notice.data, total) if completed else notice.data
    charge = UsageCharge(job.tenant_id, job.agent_id, notice.usage)
    rolled = _roll_up(job, parent, notice) if completed else Effects()
    if completed and job.plan is not None and job.plan.appends_history:
        job = replace(
            job,
            state=JobState.FINISHING,
            updated_at_ms=now,
            heartbeat_deadline_ms=job.deadline_ms,
            finishing_ms=now,
        )
        assert record.spec is not None  # kept until the job ends
        lease = Handoff(record.spec, lease_ms=now + limits.handoff_grace_ms)
        finishing = replace(record, job=job, handoff=None, result=data, finalize=lease)
        session = side.session
        if session is not None:
            session = replace(session, usage=session.usage + notice.usage)
        effects = replace(
            rolled, record=finishing, side=SessionSide(session, side.line), charge=charge
        )
        return Step(Verdict.ACCEPTED, effects)
    effects = _finished(
        replace(record, job=job),
        side,
        JobState(notice.event.value),
        data,
        limits,
        now=now,
        tokens=notice.usage if completed else None,
    )
    if completed:
        effects = replace(effects, charge=charge, parent=rolled.parent)
        effects = replace(effects, parent_session=rolled.parent_session)
    return Step(Verdict.ACCEPTED, effects)


def _roll_up(job: Job, parent: ParentSide | None, notice: Notice) -> Effects:
    """An internal call's completion: its tokens go to its parent job and the parent's
    session while the parent is in flight (none: no effects)."""
    if not job.parent_job_id or parent is None:
        return Effects()
    record = parent.record
    if record is None or not parent_in_flight(record, job.tenant_id):
        return Effects()
    usage = notice.usage
    rolled = replace(record, job=replace(record.job, usage=record.job.usage + usage))
    session = parent.session
    if session is not None:
        session = replace(session, usage=session.usage + usage)
    return Effects(parent=rolled, parent_session=session)


def finish(
    record: JobRecord | None,
    side: SessionSide,
    tenant_id: str,
    draft: EventDraft,
    limits: JobLimits,
    *,
    now: int,
) -> Step[FinishOutcome]:
    """End a job from the orchestrator's side (cancelled, failed, or completed from the
    embedding cache: that reply counts as a message, with no tokens). A FINISHING job
    completed this way (its finalize done) completes with its stored result, whatever the
    draft's data."""
    if record is None or record.job.tenant_id != tenant_id:
        return Step(FinishOutcome.UNKNOWN_JOB)
    if record.job.state.is_final:
        return Step(FinishOutcome.ALREADY_FINAL)
    state = JobState(draft.kind.value)
    data = draft.data
    if state is JobState.COMPLETED and record.job.state is JobState.FINISHING:
        data = record.result or {}
    effects = _finished(record, side, state, data, limits, now=now)
    return Step(FinishOutcome.DONE, effects)


def record_plan(
    record: JobRecord | None,
    tenant_id: str,
    plan: OrchestrationPlan,
    steps: Sequence[ServiceCall],
    outputs: Mapping[str, Any] | None,
) -> Step[bool]:
    """Store an unfinished job's plan as it now is, with a ``plan_step`` event for each of
    ``steps`` (calls of ``plan`` whose state changed) and, when given, what the finished
    pre-steps produced for the run (``outputs``). False (and no change) when the job ended,
    is unknown or is another tenant's."""
    if record is None or record.job.tenant_id != tenant_id or record.job.state.is_final:
        return Step(False)
    job = replace(record.job, plan=plan)
    updated = replace(record, job=job, outputs=record.outputs if outputs is None else outputs)
    drafts = tuple(
        EventDraft(job.job_id, EventKind.PLAN_STEP, job.request_id, plan.step_event(call))
        for call in steps
    )
    return Step(True, Effects(record=updated, events=drafts))


def reap(record: JobRecord, side: SessionSide, limits: JobLimits, *, now: int) -> Step[bool]:
    """Time the job out if it is past its deadline or its heartbeat deadline (True); one a
    heartbeat moved is looked at again by its new due time."""
    job = record.job
    if job.state.is_final:
        return Step(False)
    due = _due(job)
    if now < due:
        return Step(False, Effects(look_at_ms=due))
    effects = _finished(record, side, JobState.TIMED_OUT, {"deadline_ms": due}, limits, now=now)
    return Step(True, effects)


def _finished(
    record: JobRecord,
    side: SessionSide,
    state: JobState,
    data: Any,
    limits: JobLimits,
    *,
    now: int,
    tokens: TokenUsage | None = None,
) -> Effects:
    """The job ends in ``state``: kept for its retention, its hand-off gone, out of its
    session's pending set and line (an idle busy session becomes active again); a completed one
    counts as a message (and ``tokens`` for the session)."""
    job = replace(record.job, state=state, updated_at_ms=now)
    ended = JobRecord(job, now + limits.retention_ms)
    event = EventDraft(job.job_id, EventKind(state.value), job.request_id, data)
    line = tuple(j for j in side.line if j != job.job_id)
    session = side.session
    if session is not None:
        pending = tuple(j for j in session.pending_job_ids if j != job.job_id)
        changes: dict[str, Any] = {"pending_job_ids": pending}
        if session.state is SessionState.BUSY and not pending:
            changes.update(state=SessionState.ACTIVE, updated_at_ms=now)
        if state is JobState.COMPLETED:
            changes.update(message_count=session.message_count + 1)
            if tokens is not None:
                changes.update(usage=session.usage + tokens)
        session = replace(session, **changes)
    return Effects(record=ended, side=SessionSide(session, line), event=event)

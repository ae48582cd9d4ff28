"""The job flow's domain objects: jobs (tasks), notices from services and session events.

A job is one piece of work handed to a downstream service. Its state machine is

    [queued ->] pending -> running [-> finishing] -> completed | failed | timed_out | cancelled

A job starts QUEUED when it must wait for its turn: background work, or a message sent while the
session already has jobs in flight. A queued job is handed to its service (QUEUED -> PENDING)
only once every job its session accepted before it has finished; it can be cancelled or time
out while it waits. A job whose plan (domain.plans) has calls after the work itself (appending
the conversation turns) turns FINISHING on its service's ``completed`` notice: its result and
usage are stored, and it completes once those calls are done (docs/adr/0010).

Every transition is atomic in the registry, so a duplicate or late notice changes nothing.
Everything that happens to a job becomes a SessionEvent with a per-session, strictly increasing
sequence number; clients follow those events live and resume from a sequence.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from domain.agents import AgentConfig
from domain.dispatch import WorkRequest
from domain.models import Service, SessionState, TokenUsage, WorkKind
from domain.plans import OrchestrationPlan, StepName, StepState, plan_for
from domain.ports.queue import QueuePriority
from domain.service_caps import NO_CAPS, ServiceCaps


class JobState(enum.StrEnum):
    QUEUED = "queued"
    PENDING = "pending"
    RUNNING = "running"
    # The service completed the work; the plan's calls after it (append_history) are running.
    FINISHING = "finishing"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self not in UNFINISHED_STATES


# The states a job can still leave (every other state is final).
UNFINISHED_STATES = (JobState.QUEUED, JobState.PENDING, JobState.RUNNING, JobState.FINISHING)


class EventKind(enum.StrEnum):
    """What a session event reports (the ChatEvent oneof)."""

    ACCEPTED = "accepted"
    PROGRESS = "progress"
    DELTA = "delta"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    HISTORY_TRUNCATED = "history_truncated"
    # Agent work as it happens (none of them ends the job): a tool call the agent started or
    # finished (Agent Execution), a workflow step (Workflow Engine), a call of the job's plan.
    TOOL_CALL = "tool_call"
    WORKFLOW_STEP = "workflow_step"
    PLAN_STEP = "plan_step"
    # A stored event that could not be read (never written): it keeps its sequence so followers
    # count past it, and clients do not see it (a final one is read as failed instead, see
    # unreadable_event).
    UNREADABLE = "unreadable"

    @property
    def is_final(self) -> bool:
        return self in _FINAL_EVENTS


_FINAL_EVENTS = frozenset(
    {EventKind.COMPLETED, EventKind.FAILED, EventKind.TIMED_OUT, EventKind.CANCELLED}
)


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """One event of a session as stored and fanned out.

    ``data`` holds the kind's payload as plain JSON-compatible values:
    accepted {service, kind, content, deadline_ms[, queued]}; progress {fraction, message};
    delta {text}; completed {result, usage}; failed {error}; timed_out {deadline_ms};
    cancelled {reason}; history_truncated {requested_after, oldest_retained};
    tool_call {call_id, name, phase, arguments, result_summary[, error]} (``arguments`` the
    call's arguments as JSON text, ``phase`` a StepPhase); workflow_step {step_id, name, index,
    phase, summary[, error]}; plan_step {index, name, service, method, state, attempts[,
    started_ms][, ended_ms][, error]} (domain.plans: ``state`` a StepState, ``service`` a
    Service). ``error`` is {code, message, retryable} everywhere.
    """

    session_id: str
    job_id: str
    sequence: int
    time_ms: int
    kind: EventKind
    request_id: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)


UNREADABLE_EVENT_CODE = "unreadable_event"


def unreadable_event(
    session_id: str, sequence: int, time_ms: int, job_id: str, kind: str, reason: str
) -> SessionEvent:
    """What a stored event that cannot be read stands for. A final one (``kind``) still ends
    its job for everyone following it: it reads as a failure of the job, with code
    ``unreadable_event``; any other one is UNREADABLE, which clients do not see."""
    if kind in _FINAL_EVENTS and job_id:
        error = {
            "code": UNREADABLE_EVENT_CODE,
            "message": f"the job's {kind} event (sequence {sequence}) cannot be read: {reason}",
            "retryable": False,
        }
        return SessionEvent(
            session_id, job_id, sequence, time_ms, EventKind.FAILED, data={"error": error}
        )
    data = {"kind": kind, "reason": reason}
    return SessionEvent(session_id, job_id, sequence, time_ms, EventKind.UNREADABLE, data=data)


@dataclass(frozen=True, slots=True)
class EventDraft:
    """An event before the registry gives it a sequence and a time."""

    job_id: str
    kind: EventKind
    request_id: str
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class EventPage:
    """Retained events after a cursor. ``oldest_retained`` is the sequence of the oldest event
    still stored (None when none is); ``last_sequence`` the newest sequence ever assigned."""

    events: list[SessionEvent]
    oldest_retained: int | None
    last_sequence: int


@dataclass(frozen=True, slots=True)
class JobLimits:
    """Configured job timing, in milliseconds."""

    # The job fails as timed_out this long after it started, whatever it reports.
    deadline_ms: int
    # ...or this long after its last notice (progress and deltas extend it).
    heartbeat_ms: int
    # How long finished jobs stay readable.
    retention_ms: int
    # A queued job times out if its turn has not come this long after it was accepted.
    queue_timeout_ms: int = 3_600_000
    # A PENDING job whose hand-off to its service has not been confirmed this long after it
    # started (or after its lease was last renewed) is handed over again by any process...
    handoff_grace_ms: int = 5_000
    # ...up to this many hand-offs in all; then (or past its deadline) it fails handoff_failed.
    handoff_attempts: int = 3
    # Internal calls (domain.internal_calls: child jobs) one job may make in all.
    max_internal_calls: int = 64
    # Per-tenant limits toward the services, checked by the start path (domain.service_caps).
    caps: ServiceCaps = NO_CAPS


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job about to be handed to a service."""

    job_id: str
    session_id: str
    agent_id: str
    service: Service
    kind: WorkKind
    content: str
    request_id: str
    model: str = ""
    # Set for cacheable embedding work: where the completed result is cached
    # (domain.embedding_cache).
    cache_key: str = ""
    # RAG collections to search (kept with the job until it is handed over, like content).
    collections: tuple[str, ...] = ()
    # Keep the job's final event with the job record (Job.final_event) for its retention, so
    # work delivered again after its job ended (a batch item whose worker died) reads the
    # outcome even when the session's log no longer retains it.
    keep_final: bool = False
    # Where a QUEUED job goes on the ``chat`` work queue (kept with it until it is handed over).
    priority: QueuePriority = QueuePriority.NORMAL
    # The job's plan (domain.plans; None: a job of one call, as before plans) and the agent
    # configuration it was made from (what the run needs: model, prompt, tools, limits).
    plan: OrchestrationPlan | None = None
    agent: AgentConfig | None = None
    # The W3C trace context the job was accepted under (the accepting RPC's server span with
    # tracing on, else the caller's traceparent; '' for none): work done for the job later,
    # in any process, continues its trace (domain.ports.tracing).
    traceparent: str = ""
    # Set on an internal call's job (a child job, domain.internal_calls): the job it was made
    # for (same tenant). The start refuses it unless that job is in flight (PENDING or
    # RUNNING) and has internal calls left (JobLimits.max_internal_calls); its tokens are
    # rolled up into that job and its session when it completes.
    parent_job_id: str = ""

    def recorded(
        self, tenant_id: str, now_ms: int, limits: JobLimits, *, queued: bool = False
    ) -> Job:
        """The job a store records for this at ``now_ms``: PENDING, or QUEUED (whose deadlines
        are the queue timeout until its turn comes)."""
        deadline_ms = now_ms + (limits.queue_timeout_ms if queued else limits.deadline_ms)
        heartbeat_ms = deadline_ms if queued else now_ms + limits.heartbeat_ms
        return Job(
            job_id=self.job_id,
            tenant_id=tenant_id,
            session_id=self.session_id,
            service=self.service,
            kind=self.kind,
            state=JobState.QUEUED if queued else JobState.PENDING,
            request_id=self.request_id,
            created_at_ms=now_ms,
            updated_at_ms=now_ms,
            deadline_ms=deadline_ms,
            heartbeat_deadline_ms=heartbeat_ms,
            agent_id=self.agent_id,
            model=self.model,
            cache_key=self.cache_key,
            keep_final=self.keep_final,
            plan=self.plan,
            agent=self.agent,
            traceparent=self.traceparent,
            parent_job_id=self.parent_job_id,
        )

    def work(self, tenant_id: str) -> WorkRequest:
        """The work the job's service is handed (a plan adds its run's service and the agent's
        snapshot: domain.plan_runner)."""
        return WorkRequest(
            job_id=self.job_id,
            tenant_id=tenant_id,
            session_id=self.session_id,
            agent_id=self.agent_id,
            kind=self.kind,
            content=self.content,
            model=self.model,
            collections=self.collections,
        )


@dataclass(frozen=True, slots=True)
class Job:
    """A job as recorded."""

    job_id: str
    tenant_id: str
    session_id: str
    service: Service
    kind: WorkKind
    state: JobState
    request_id: str
    created_at_ms: int
    updated_at_ms: int
    deadline_ms: int
    heartbeat_deadline_ms: int
    last_notice_sequence: int = 0
    usage: TokenUsage = field(default_factory=TokenUsage)
    agent_id: str = ""
    model: str = ""
    cache_key: str = ""
    keep_final: bool = False
    # The job's final event, once it ended, when it was started with ``keep_final``.
    final_event: SessionEvent | None = None
    # Its plan as last recorded (every call's state), and the agent it was made from.
    plan: OrchestrationPlan | None = None
    agent: AgentConfig | None = None
    # When its service completed the work and it turned FINISHING (0: it never did); kept
    # once it ends: ``plan_of`` settles the calls after the work by it.
    finishing_ms: int = 0
    # The trace context it was accepted under (NewJob.traceparent).
    traceparent: str = ""
    # A child job's parent (NewJob.parent_job_id); on a parent, the ids of the internal calls'
    # jobs started for it so far, oldest first. A parent's ``usage`` includes its children's
    # tokens (rolled up as each completes while it is in flight).
    parent_job_id: str = ""
    internal_call_ids: tuple[str, ...] = ()

    def handed_again(self, content: str, collections: Sequence[str]) -> NewJob:
        """This job to hand to its service again, with the parts of its message the record
        does not keep."""
        return NewJob(
            job_id=self.job_id,
            session_id=self.session_id,
            agent_id=self.agent_id,
            service=self.service,
            kind=self.kind,
            content=content,
            request_id=self.request_id,
            model=self.model,
            cache_key=self.cache_key,
            collections=tuple(collections),
            plan=self.plan,
            agent=self.agent,
            traceparent=self.traceparent,
            parent_job_id=self.parent_job_id,
        )


def plan_of(job: Job) -> OrchestrationPlan:
    """The job's plan as an operator sees it: the stored one (a job started without one: its
    one call, the work), with the calls the job's state settles. The service's notices move
    the job, not the stored plan, and a finalize that succeeds records nothing of its own: the
    work's call is RUNNING while the job is, DONE once the service completed it (the job
    turned FINISHING, or completed); the append after it (a plan's append_history) is RUNNING
    while the job is FINISHING and DONE once it completed. A call that was running when the
    job ended otherwise (cancelled, timed out, failed) shows FAILED; one that had not started,
    SKIPPED. What the stored plan says finished (a failed call, recorded with its error) stays."""
    plan = job.plan or plan_for(job.kind, None, now_ms=0)
    if job.state in (JobState.QUEUED, JobState.PENDING):
        return plan
    completed = job.state is JobState.COMPLETED
    # When the work was done: the job turned FINISHING then, or completed outright.
    work_done = completed or job.state is JobState.FINISHING
    work_done_ms = job.finishing_ms or (job.updated_at_ms if work_done else 0)
    run = plan.call(StepName.RUN)
    if not run.state.is_final:
        if job.state is JobState.RUNNING:
            run = replace(run, state=StepState.RUNNING)
        elif work_done_ms:
            run = replace(run, state=StepState.DONE, ended_ms=run.ended_ms or work_done_ms)
        else:  # ended otherwise: while the service had it, or before
            state = StepState.FAILED if run.state is StepState.RUNNING else StepState.SKIPPED
            run = replace(run, state=state)
        plan = plan.with_call(run)
    if not work_done_ms or not plan.has(StepName.APPEND_HISTORY):
        return plan
    append = plan.call(StepName.APPEND_HISTORY)
    if append.state.is_final:
        return plan
    started = replace(append, started_ms=append.started_ms or work_done_ms)
    if job.state is JobState.FINISHING:
        return plan.with_call(replace(started, state=StepState.RUNNING))
    state = StepState.DONE if completed else StepState.FAILED
    ended = replace(
        started, state=state, attempts=max(append.attempts, 1), ended_ms=job.updated_at_ms
    )
    return plan.with_call(ended)


@dataclass(frozen=True, slots=True)
class HandoffClaim:
    """A job whose hand-off was interrupted (no confirmation within its lease), claimed by one
    process: ``job`` is its work spec as recorded at the start, ``attempt`` the number of this
    hand-off (2: the first redo). For a PENDING job the hand-off is to its service; for a QUEUED
    job whose work item was never confirmed on the ``chat`` work queue (``requeue``) it is that
    enqueue, redone under the same item id (the job id) with ``accepted_sequence``. The claim
    holds a new lease, so no other process takes it meanwhile. ``exhausted``: it had had every
    attempt, or was past its deadline, and the claim itself failed it ``handoff_failed``
    (``handoff_failed_data``) in the same atomic step.

    ``finalize``: the job is FINISHING (its service completed it) and the plan's calls after
    the work (append_history) are to be run (again), then the job completed with ``result``
    (the completed notice's data, as stored); ``job.plan`` is the plan as last recorded, and
    ``job.agent`` None (those calls need no agent snapshot, so the claim does not carry it). An
    exhausted finalize claim failed the job ``step_failed`` naming append_history. ``outputs``
    are what the plan's finished pre-steps recorded for the run (history, tools);
    ``deadline_ms`` the job's deadline (the backend's clock), which bounds retries."""

    tenant_id: str
    job: NewJob
    attempt: int
    exhausted: bool = False
    requeue: bool = False
    accepted_sequence: int = 0
    finalize: bool = False
    result: Mapping[str, Any] | None = None
    outputs: Mapping[str, Any] | None = None
    deadline_ms: int = 0


def handoff_failed_data(service: str, attempts: int | str) -> dict[str, Any]:
    """The data of the failed event of a job whose hand-off was interrupted too often (the
    stores fill it in when a claim finds the attempts used up)."""
    return {
        "error": {
            "code": "handoff_failed",
            "message": (
                f"the job could not be handed to the {service} service "
                f"({attempts} hand-offs interrupted)"
            ),
            "retryable": True,
        }
    }


def step_failed_error(step: str, service: str, message: str, *, retryable: bool) -> dict[str, Any]:
    """The error of a job failed by a call of its plan: code ``step_failed``, the message
    naming the step and the service."""
    return {
        "code": "step_failed",
        "message": f"{step} ({service}): {message}",
        "retryable": retryable,
        "step": step,
        "service": service,
    }


def finalize_failed_data(attempts: int | str) -> dict[str, Any]:
    """The data of the failed event of a FINISHING job whose finalize (appending the turns)
    was interrupted too often (the stores fill it in when a claim finds the attempts used up)."""
    message = f"the turns could not be appended ({attempts} attempts interrupted)"
    return {"error": step_failed_error("append_history", "conversation", message, retryable=True)}


def usage_data(usage: TokenUsage) -> dict[str, int]:
    """Token counts as an event's ``usage`` member."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def with_usage(data: Mapping[str, Any], usage: TokenUsage) -> dict[str, Any]:
    """A completed event's data with its ``usage`` member (last) set to ``usage``: the job's
    own tokens and those of the internal calls rolled up into it (the stores write it so)."""
    out = {k: v for k, v in data.items() if k != "usage"}
    out["usage"] = usage_data(usage)
    return out


class NoticeEvent(enum.StrEnum):
    """What a notice reports. A job notice's value is the EventKind of the event it appends
    (the stores rely on it)."""

    PROGRESS = "progress"
    DELTA = "delta"
    COMPLETED = "completed"
    FAILED = "failed"
    # A tool call started or ended (Agent Execution): applied like progress.
    TOOL_CALL = "tool_call"
    # A workflow step started or ended (Workflow Engine): applied like progress.
    STEP = "workflow_step"
    # Not about a job: Agent Management reports that an agent's configuration changed
    # (domain.notices.AgentChange).
    AGENT_CHANGED = "agent_changed"

    @property
    def keeps_running(self) -> bool:
        """Whether the notice reports work in progress: the job turns (or stays) RUNNING, its
        heartbeat is extended and the event appended; it does not end the job."""
        return self in _RUNNING_NOTICES


_RUNNING_NOTICES = frozenset(
    {NoticeEvent.PROGRESS, NoticeEvent.DELTA, NoticeEvent.TOOL_CALL, NoticeEvent.STEP}
)


class StepPhase(enum.StrEnum):
    """Where a tool call or a workflow step is (orchestrator.v1.StepPhase)."""

    STARTED = "started"
    FINISHED = "finished"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Notice:
    """A validated notice from a service about one of its jobs."""

    event: NoticeEvent
    service: Service
    job_id: str
    tenant_id: str
    sequence: int
    agent_id: str = ""
    # The event payload for the session (see SessionEvent.data).
    data: Mapping[str, Any] = field(default_factory=dict)
    usage: TokenUsage = field(default_factory=TokenUsage)


class Verdict(enum.StrEnum):
    """What became of a notice."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    UNKNOWN_JOB = "unknown_job"
    WRONG_TENANT = "wrong_tenant"
    WRONG_SERVICE = "wrong_service"
    JOB_FINISHED = "job_finished"
    MALFORMED = "malformed"


@dataclass(frozen=True, slots=True)
class NoticeOutcome:
    verdict: Verdict
    event: SessionEvent | None = None
    detail: str = ""
    # A completed notice turned the job FINISHING (no event yet): the finalize to run, claimed
    # for the process that applied the notice (it holds the finalize lease).
    finishing: HandoffClaim | None = None
    # An accepted notice's job's trace context (NewJob.traceparent; '' for none).
    traceparent: str = ""


class IfBusy(enum.StrEnum):
    """What starting a job does when its session already has jobs in flight (queued or not)."""

    # Start it now regardless (a batch's own session runs its items side by side).
    RUN = "run"
    # Refuse: StartRefused.SESSION_BUSY.
    REJECT = "reject"
    # Record it QUEUED, behind them.
    HOLD = "hold"


class ActivateOutcome(enum.StrEnum):
    """What asking to start a QUEUED job found."""

    # Now PENDING: hand it to its service.
    STARTED = "started"
    # Jobs its session accepted before it are still in flight.
    WAIT = "wait"
    # Already PENDING or RUNNING: an earlier delivery of its work item started it.
    ALREADY_STARTED = "already_started"
    # Finished while it waited (cancelled or timed out).
    FINAL = "final"
    UNKNOWN_JOB = "unknown_job"
    # Its session was closed or expired while it waited.
    SESSION_NOT_OPEN = "session_not_open"


class StartRefused(enum.StrEnum):
    """Why a job could not be recorded for a session."""

    SESSION_MISSING = "session_missing"
    SESSION_NOT_OPEN = "session_not_open"
    SESSION_BUSY = "session_busy"
    # A job with this id was already recorded (ids derived from redelivered work repeat).
    JOB_EXISTS = "job_exists"
    # An internal call's parent job is not in flight (unknown, another tenant's, or ended).
    PARENT_NOT_IN_FLIGHT = "parent_not_in_flight"
    # An internal call's parent job has made JobLimits.max_internal_calls calls already.
    CALL_LIMIT = "call_limit"


@dataclass(frozen=True, slots=True)
class SessionNotOpen:
    """A job could not be recorded because its session is not open (``start_on_session``):
    the state the session was found in (closed or expired)."""

    state: SessionState


@dataclass(frozen=True, slots=True)
class StartedJob:
    job: Job
    accepted: SessionEvent

    @property
    def queued(self) -> bool:
        """Whether the job waits for its turn instead of going to its service now."""
        return self.job.state is JobState.QUEUED


class FinishOutcome(enum.StrEnum):
    """Result of finishing a job from the orchestrator's side (cancel, dispatch failure)."""

    DONE = "done"
    UNKNOWN_JOB = "unknown_job"
    ALREADY_FINAL = "already_final"

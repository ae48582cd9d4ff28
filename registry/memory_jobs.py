"""Jobs and session events in process memory: the embedded default (single process only).

Same semantics as the Redis store (the contract tests run against both): every change is made
without an await in between, which on one event loop makes it atomic.
"""

from __future__ import annotations

import contextlib
import heapq
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from domain.jobs import (
    UNFINISHED_STATES,
    ActivateOutcome,
    EventDraft,
    EventKind,
    EventPage,
    FinishOutcome,
    HandoffClaim,
    IfBusy,
    Job,
    JobLimits,
    JobState,
    NewJob,
    Notice,
    NoticeEvent,
    NoticeOutcome,
    SessionEvent,
    StartedJob,
    StartRefused,
    Verdict,
    handoff_failed_data,
)
from domain.models import SessionState
from registry.fanout import Feed, LocalFanout
from registry.memory_sessions import MemorySessionStore, wall_clock_ms
from registry.memory_usage import MemoryUsageStore


@dataclass(slots=True)
class _Handoff:
    """A job's work spec until it is handed over, and its hand-off lease (while PENDING, or
    while QUEUED and not confirmed on the work queue: ``enqueue_sequence`` is then its
    accepted event's sequence)."""

    tenant_id: str
    spec: NewJob
    lease_ms: int = 0
    attempts: int = 0
    enqueue_sequence: int | None = None

    def leased(self, state: JobState) -> bool:
        """Whether a hand-off (or an enqueue) of a job in ``state`` is in progress."""
        return state is JobState.PENDING or (
            state is JobState.QUEUED and self.enqueue_sequence is not None
        )


@dataclass(slots=True)
class _SessionLog:
    last: int = 0
    events: deque[SessionEvent] = field(default_factory=deque)
    touched_ms: int = 0


class MemoryEventLog:
    """domain.ports.events.EventLog in memory; also where the memory job store appends."""

    def __init__(
        self, *, max_events: int, ttl_ms: int, clock: Callable[[], int] = wall_clock_ms
    ) -> None:
        self._max_events = max_events
        self._ttl_ms = ttl_ms
        self._clock = clock
        self._logs: dict[tuple[str, str], _SessionLog] = {}
        self.fanout = LocalFanout()

    def _log(self, key: tuple[str, str]) -> _SessionLog | None:
        log = self._logs.get(key)
        if log is not None and self._clock() >= log.touched_ms + self._ttl_ms:
            del self._logs[key]
            return None
        return log

    def append(self, tenant_id: str, session_id: str, draft: EventDraft) -> SessionEvent:
        key = (tenant_id, session_id)
        log = self._log(key)
        if log is None:
            log = self._logs[key] = _SessionLog()
        now = self._clock()
        log.last += 1
        log.touched_ms = now
        event = SessionEvent(
            session_id=session_id,
            job_id=draft.job_id,
            sequence=log.last,
            time_ms=now,
            kind=draft.kind,
            request_id=draft.request_id,
            data=draft.data,
        )
        log.events.append(event)
        while len(log.events) > self._max_events:
            log.events.popleft()
        self.fanout.deliver(key, event)
        return event

    def session_closed(self, tenant_id: str, session_id: str) -> None:
        self.fanout.close_session((tenant_id, session_id))

    async def read_after(
        self, tenant_id: str, session_id: str, after: int, *, limit: int
    ) -> EventPage:
        log = self._log((tenant_id, session_id))
        if log is None:
            return EventPage([], None, 0)
        events = [e for e in log.events if e.sequence > after][:limit]
        oldest = log.events[0].sequence if log.events else None
        return EventPage(events, oldest, log.last)

    @contextlib.asynccontextmanager
    async def subscribe(self, tenant_id: str, session_id: str) -> AsyncIterator[Feed]:
        feed = Feed((tenant_id, session_id))
        self.fanout.add(feed)
        try:
            yield feed
        finally:
            self.fanout.remove(feed)

    async def aclose(self) -> None:
        return None


class MemoryJobStore:
    """domain.ports.jobs.JobStore in memory, over the memory session store and event log."""

    def __init__(
        self,
        sessions: MemorySessionStore,
        events: MemoryEventLog,
        *,
        usage: MemoryUsageStore | None = None,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self._sessions = sessions
        self._events = events
        self._clock = clock
        self.usage = usage if usage is not None else MemoryUsageStore(clock=clock)
        self._jobs: dict[str, Job] = {}
        self._expires: dict[str, int] = {}  # job id -> when the record is dropped
        self._deadlines: list[tuple[int, str]] = []  # heap of (due, job id), a hint
        # (tenant, session) -> the session's QUEUED job ids, oldest first.
        self._lines: dict[tuple[str, str], deque[str]] = {}
        self._unfinished: set[str] = set()  # ids of jobs last seen unfinished
        # job id -> work spec and lease, from the start until the job is handed over or ends.
        self._handoffs: dict[str, _Handoff] = {}

    def _job(self, job_id: str) -> Job | None:
        job = self._jobs.get(job_id)
        if job is not None and self._clock() >= self._expires[job_id]:
            del self._jobs[job_id], self._expires[job_id]
            return None
        return job

    def _release(self, job: Job, now: int, *, completed_usage: bool) -> None:
        session = self._sessions.peek(job.tenant_id, job.session_id)
        if session is None:
            return
        line = self._lines.get((job.tenant_id, job.session_id))
        if line is not None and job.job_id in line:
            line.remove(job.job_id)
        pending = tuple(j for j in session.pending_job_ids if j != job.job_id)
        changes: dict[str, Any] = {"pending_job_ids": pending}
        if session.state is SessionState.BUSY and not pending:
            changes.update(state=SessionState.ACTIVE, updated_at_ms=now)
        if completed_usage:
            changes.update(message_count=session.message_count + 1, usage=session.usage + job.usage)
        self._sessions.put(replace(session, **changes))

    async def start_job(
        self, tenant_id: str, new: NewJob, limits: JobLimits, *, if_busy: IfBusy, hold: bool = False
    ) -> StartedJob | StartRefused:
        if self._job(new.job_id) is not None:
            return StartRefused.JOB_EXISTS
        session = self._sessions.peek(tenant_id, new.session_id)
        if session is None:
            return StartRefused.SESSION_MISSING
        if not session.state.is_open:
            return StartRefused.SESSION_NOT_OPEN
        busy = bool(session.pending_job_ids)
        if if_busy is IfBusy.REJECT and busy:
            return StartRefused.SESSION_BUSY
        queued = hold or (if_busy is IfBusy.HOLD and busy)
        now = self._clock()
        job = new.recorded(tenant_id, now, limits, queued=queued)
        self._jobs[new.job_id] = job
        lifetime = limits.queue_timeout_ms + limits.deadline_ms if queued else limits.deadline_ms
        self._expires[new.job_id] = now + lifetime + limits.retention_ms
        self._unfinished.add(new.job_id)
        due = min(job.deadline_ms, job.heartbeat_deadline_ms)
        heapq.heappush(self._deadlines, (due, new.job_id))
        handoff = self._handoffs[new.job_id] = _Handoff(
            tenant_id, new, lease_ms=now + limits.handoff_grace_ms, attempts=1
        )
        if queued:
            self._lines.setdefault((tenant_id, new.session_id), deque()).append(new.job_id)
        self._sessions.put(
            replace(
                session,
                state=SessionState.BUSY,
                updated_at_ms=now,
                message_count=session.message_count + 1,
                pending_job_ids=tuple(sorted((*session.pending_job_ids, new.job_id))),
            )
        )
        data: dict[str, Any] = {
            "service": new.service.value,
            "kind": new.kind.value,
            "content": new.content,
            "model": new.model,
            "deadline_ms": due,
        }
        if queued:
            data["queued"] = True
        event = self._events.append(
            tenant_id,
            new.session_id,
            EventDraft(new.job_id, EventKind.ACCEPTED, new.request_id, data),
        )
        if queued:
            handoff.enqueue_sequence = event.sequence  # its first hand-off: the enqueue
        return StartedJob(job, event)

    async def activate_job(self, tenant_id: str, job_id: str, limits: JobLimits) -> ActivateOutcome:
        job = self._job(job_id)
        if job is None or job.tenant_id != tenant_id:
            return ActivateOutcome.UNKNOWN_JOB
        if job.state in (JobState.PENDING, JobState.RUNNING):
            return ActivateOutcome.ALREADY_STARTED
        if job.state.is_final:
            return ActivateOutcome.FINAL
        handoff = self._handoffs.get(job_id)
        if handoff is not None:  # its work item was delivered: the enqueue is confirmed
            handoff.enqueue_sequence = None
        session = self._sessions.peek(tenant_id, job.session_id)
        if session is None or not session.state.is_open:
            return ActivateOutcome.SESSION_NOT_OPEN
        line = self._lines.get((tenant_id, job.session_id))
        # Its turn: first in the line, and every job in flight is in the line (none started).
        if not line or line[0] != job_id or len(session.pending_job_ids) > len(line):
            return ActivateOutcome.WAIT
        line.popleft()
        if not line:
            del self._lines[(tenant_id, job.session_id)]
        now = self._clock()
        job = replace(
            job,
            state=JobState.PENDING,
            updated_at_ms=now,
            deadline_ms=now + limits.deadline_ms,
            heartbeat_deadline_ms=now + limits.heartbeat_ms,
        )
        self._jobs[job_id] = job
        self._expires[job_id] = now + limits.deadline_ms + limits.retention_ms
        heapq.heappush(self._deadlines, (min(job.deadline_ms, job.heartbeat_deadline_ms), job_id))
        if handoff is not None:
            handoff.lease_ms, handoff.attempts = now + limits.handoff_grace_ms, 1
        return ActivateOutcome.STARTED

    async def renew_handoff(self, tenant_id: str, job_id: str, limits: JobLimits) -> bool:
        handoff = self._handoffs.get(job_id)
        job = self._job(job_id)
        if handoff is None or job is None or job.tenant_id != tenant_id:
            return False
        if not handoff.leased(job.state):
            return False
        handoff.lease_ms = self._clock() + limits.handoff_grace_ms
        return True

    async def enqueue_done(self, tenant_id: str, job_id: str) -> None:
        handoff = self._handoffs.get(job_id)
        if handoff is not None and handoff.tenant_id == tenant_id:
            handoff.enqueue_sequence = None

    async def handoff_done(self, tenant_id: str, job_id: str) -> None:
        handoff = self._handoffs.get(job_id)
        if handoff is not None and handoff.tenant_id == tenant_id:
            del self._handoffs[job_id]

    async def claim_handoffs(self, limits: JobLimits, *, limit: int) -> list[HandoffClaim]:
        now = self._clock()
        claims: list[HandoffClaim] = []
        for job_id, handoff in list(self._handoffs.items()):
            if len(claims) >= limit:
                break
            job = self._job(job_id)
            if job is None or job.state.is_final:
                del self._handoffs[job_id]
                continue
            if not handoff.leased(job.state) or now < handoff.lease_ms:
                continue  # enqueued (waits for its turn), or its lease holds
            requeue = handoff.enqueue_sequence
            claim = HandoffClaim(
                handoff.tenant_id,
                handoff.spec,
                handoff.attempts,
                requeue=requeue is not None,
                accepted_sequence=requeue or 0,
            )
            if handoff.attempts >= limits.handoff_attempts or now >= job.deadline_ms:
                # Failed in the same step as the claim (nothing can happen in between).
                data = handoff_failed_data(job.service.value, handoff.attempts)
                self._finish(job, JobState.FAILED, data, limits)
                claims.append(replace(claim, exhausted=True))
                continue
            handoff.lease_ms = now + limits.handoff_grace_ms
            handoff.attempts += 1
            claims.append(replace(claim, attempt=handoff.attempts))
        return claims

    async def apply_notice(self, notice: Notice, limits: JobLimits) -> NoticeOutcome:
        job = self._job(notice.job_id)
        if job is None:
            return NoticeOutcome(Verdict.UNKNOWN_JOB)
        if job.tenant_id != notice.tenant_id:
            return NoticeOutcome(Verdict.WRONG_TENANT)
        if job.service is not notice.service:
            return NoticeOutcome(Verdict.WRONG_SERVICE)
        if job.state is JobState.QUEUED:  # not handed to any service yet
            return NoticeOutcome(Verdict.UNKNOWN_JOB)
        sequence = notice.sequence or job.last_notice_sequence + 1  # 0: unnumbered
        if sequence <= job.last_notice_sequence:
            return NoticeOutcome(Verdict.DUPLICATE)
        if job.state.is_final:
            return NoticeOutcome(Verdict.JOB_FINISHED)
        now = self._clock()
        self._handoffs.pop(job.job_id, None)  # the service has it
        if notice.event in (NoticeEvent.PROGRESS, NoticeEvent.DELTA):
            job = replace(
                job,
                state=JobState.RUNNING,
                last_notice_sequence=sequence,
                updated_at_ms=now,
                heartbeat_deadline_ms=now + limits.heartbeat_ms,
            )
            self._jobs[job.job_id] = job
        else:
            job = replace(job, last_notice_sequence=sequence, usage=notice.usage)
            if notice.event is NoticeEvent.COMPLETED:
                self.usage.add(job.tenant_id, job.agent_id, job.usage)
            final = self._finish(job, JobState(notice.event.value), notice.data, limits)
            return NoticeOutcome(Verdict.ACCEPTED, final)
        event = self._events.append(
            job.tenant_id,
            job.session_id,
            EventDraft(job.job_id, EventKind(notice.event.value), job.request_id, notice.data),
        )
        return NoticeOutcome(Verdict.ACCEPTED, event)

    async def finish_job(
        self, tenant_id: str, job_id: str, draft: EventDraft, limits: JobLimits
    ) -> tuple[FinishOutcome, SessionEvent | None]:
        job = self._job(job_id)
        if job is None or job.tenant_id != tenant_id:
            return FinishOutcome.UNKNOWN_JOB, None
        if job.state.is_final:
            return FinishOutcome.ALREADY_FINAL, None
        return FinishOutcome.DONE, self._finish(job, JobState(draft.kind.value), draft.data, limits)

    def _finish(
        self, job: Job, state: JobState, data: dict[str, Any] | Any, limits: JobLimits
    ) -> SessionEvent:
        now = self._clock()
        job = replace(job, state=state, updated_at_ms=now)
        self._jobs[job.job_id] = job
        self._expires[job.job_id] = now + limits.retention_ms
        self._unfinished.discard(job.job_id)
        self._handoffs.pop(job.job_id, None)
        # Completed from the embedding cache: the reply counts as a message (usage is 0).
        self._release(job, now, completed_usage=state is JobState.COMPLETED)
        event = self._events.append(
            job.tenant_id,
            job.session_id,
            EventDraft(job.job_id, EventKind(state.value), job.request_id, data),
        )
        if job.keep_final:
            self._jobs[job.job_id] = replace(job, final_event=event)
        return event

    async def get_job(self, tenant_id: str, job_id: str) -> Job | None:
        job = self._job(job_id)
        return job if job is not None and job.tenant_id == tenant_id else None

    async def count_unfinished(self) -> dict[JobState, int]:
        counts = dict.fromkeys(UNFINISHED_STATES, 0)
        for job_id in list(self._unfinished):
            job = self._job(job_id)  # drops a record that expired unfinished
            if job is None or job.state.is_final:
                self._unfinished.discard(job_id)
            else:
                counts[job.state] += 1
        return counts

    async def reap_expired(self, limits: JobLimits, *, limit: int) -> list[SessionEvent]:
        now = self._clock()
        events: list[SessionEvent] = []
        while self._deadlines and self._deadlines[0][0] <= now and len(events) < limit:
            _, job_id = heapq.heappop(self._deadlines)
            job = self._job(job_id)
            if job is None or job.state.is_final:
                continue
            due = min(job.deadline_ms, job.heartbeat_deadline_ms)
            if now < due:
                heapq.heappush(self._deadlines, (due, job_id))
                continue
            events.append(self._finish(job, JobState.TIMED_OUT, {"deadline_ms": due}, limits))
        return events

"""Jobs and session events in process memory: the embedded default (single process only).

Same semantics as the Redis store (the contract tests run against both): every change is made
without an await in between, which on one event loop makes it atomic.
"""

from __future__ import annotations

import bisect
import contextlib
import heapq
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from domain import job_machine, jobs
from domain.job_machine import CapReading, Effects, JobRecord, SessionSide
from domain.models import Service
from domain.plans import OrchestrationPlan, ServiceCall
from domain.service_caps import MINUTE_MS, LimitReached
from registry.fanout import Feed, LocalFanout
from registry.memory_sessions import MemorySessionStore, wall_clock_ms
from registry.memory_usage import MemoryUsageStore

# The states of a job in flight toward its service (counted by the limits toward the services).
_IN_FLIGHT = frozenset((jobs.JobState.PENDING, jobs.JobState.RUNNING))


@dataclass(slots=True)
class _SessionLog:
    last: int = 0
    events: deque[jobs.SessionEvent] = field(default_factory=deque)
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

    def append(self, tenant_id: str, session_id: str, draft: jobs.EventDraft) -> jobs.SessionEvent:
        key = (tenant_id, session_id)
        log = self._log(key)
        if log is None:
            log = self._logs[key] = _SessionLog()
        now = self._clock()
        log.last += 1
        log.touched_ms = now
        event = jobs.SessionEvent(
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
    ) -> jobs.EventPage:
        log = self._log((tenant_id, session_id))
        if log is None:
            return jobs.EventPage([], None, 0)
        events = [e for e in log.events if e.sequence > after][:limit]
        oldest = log.events[0].sequence if log.events else None
        return jobs.EventPage(events, oldest, log.last)

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
    """domain.ports.jobs.JobStore in memory, over the memory session store and event log: storage
    only (records, the session lines, the deadline heap, the hand-off index); every transition
    is domain.job_machine's."""

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
        self._records: dict[str, JobRecord] = {}
        self._deadlines: list[tuple[int, str]] = []  # heap of (due, job id), a hint
        # (tenant, session) -> the session's QUEUED job ids, oldest first.
        self._lines: dict[tuple[str, str], tuple[str, ...]] = {}
        self._unfinished: set[str] = set()  # ids of jobs last seen unfinished
        # Ids of the jobs whose record holds a hand-off, in the order they started.
        self._handoffs: dict[str, None] = {}
        # tenant -> (created ms, job id) of its jobs, oldest first (admin ListTasks).
        self._tenant_jobs: dict[str, list[tuple[int, str]]] = {}
        # tenant -> when it last started a job (admin GetStats).
        self._last_start: dict[str, int] = {}
        # (tenant, service) -> ids of its jobs last seen in flight (domain.service_caps).
        self._in_flight: dict[tuple[str, Service], set[str]] = {}
        # tenant -> (minute, tokens charged in it).
        self._minute_tokens: dict[str, tuple[int, int]] = {}

    def _record(self, job_id: str) -> JobRecord | None:
        record = self._records.get(job_id)
        if record is not None and self._clock() >= record.expires_at_ms:
            del self._records[job_id]
            return None
        return record

    def _side(self, tenant_id: str, session_id: str) -> SessionSide:
        session = self._sessions.peek(tenant_id, session_id)
        return SessionSide(session, self._lines.get((tenant_id, session_id), ()))

    def _apply(
        self, tenant_id: str, session_id: str, job_id: str, effects: Effects
    ) -> jobs.SessionEvent | None:
        """Store a transition's effects; the (first) appended event, if any."""
        events = self._apply_all(tenant_id, session_id, job_id, effects)
        return events[0] if events else None

    def _apply_all(
        self, tenant_id: str, session_id: str, job_id: str, effects: Effects
    ) -> list[jobs.SessionEvent]:
        """Store a transition's effects; the appended events."""
        record = effects.record
        if record is not None:
            self._put(record)
        side = effects.side
        if side is not None:
            if side.session is not None:
                self._sessions.put(side.session)
            if side.line:
                self._lines[(tenant_id, session_id)] = side.line
            else:
                self._lines.pop((tenant_id, session_id), None)
        if effects.parent is not None:
            self._put(effects.parent)
        if effects.parent_session is not None:
            self._sessions.put(effects.parent_session)
        if effects.charge is not None:
            charge = effects.charge
            self.usage.add(charge.tenant_id, charge.agent_id, charge.usage)
            minute = self._clock() // MINUTE_MS
            last, tokens = self._minute_tokens.get(charge.tenant_id, (minute, 0))
            tokens = tokens if last == minute else 0
            self._minute_tokens[charge.tenant_id] = (minute, tokens + charge.usage.total_tokens)
        if effects.look_at_ms is not None:
            heapq.heappush(self._deadlines, (effects.look_at_ms, job_id))
        drafts = ([effects.event] if effects.event is not None else []) + list(effects.events)
        events: list[jobs.SessionEvent] = []
        for draft in drafts:
            event = self._events.append(tenant_id, session_id, draft)
            if record is not None:
                record = job_machine.appended(record, event)
                self._put(record)
            events.append(event)
        return events

    def _reading(self, tenant_id: str, service: Service) -> CapReading:
        """The tenant's jobs in flight at ``service`` and tokens of this minute."""
        ids = self._in_flight.get((tenant_id, service), set())
        for job_id in list(ids):
            record = self._record(job_id)  # drops a record that expired unfinished
            if record is None or record.job.state not in _IN_FLIGHT:
                ids.discard(job_id)
        minute, tokens = self._minute_tokens.get(tenant_id, (0, 0))
        now_minute = self._clock() // MINUTE_MS
        return CapReading(len(ids), tokens if minute == now_minute else 0)

    def _put(self, record: JobRecord) -> None:
        job_id = record.job.job_id
        self._records[job_id] = record
        key = (record.job.tenant_id, record.job.service)
        if record.job.state in _IN_FLIGHT:
            self._in_flight.setdefault(key, set()).add(job_id)
        elif key in self._in_flight:
            self._in_flight[key].discard(job_id)
        if record.job.state.is_final:
            self._unfinished.discard(job_id)
        else:
            self._unfinished.add(job_id)
        if record.handoff is None and record.finalize is None:
            self._handoffs.pop(job_id, None)
        else:
            self._handoffs.setdefault(job_id, None)

    async def start_job(
        self,
        tenant_id: str,
        new: jobs.NewJob,
        limits: jobs.JobLimits,
        *,
        if_busy: jobs.IfBusy,
        hold: bool = False,
    ) -> jobs.StartedJob | jobs.StartRefused | LimitReached:
        step = job_machine.start(
            self._record(new.job_id),
            self._side(tenant_id, new.session_id),
            tenant_id,
            new,
            limits,
            if_busy=if_busy,
            hold=hold,
            now=self._clock(),
            parent=self._record(new.parent_job_id) if new.parent_job_id else None,
            reading=self._reading(tenant_id, new.service),
        )
        if isinstance(step.outcome, jobs.StartRefused | LimitReached):
            return step.outcome
        event = self._apply(tenant_id, new.session_id, new.job_id, step.effects)
        assert event is not None
        self._index_job(tenant_id, step.outcome.created_at_ms, new.job_id, limits)
        return jobs.StartedJob(step.outcome, event)

    async def start_on_session(
        self,
        tenant_id: str,
        new: jobs.NewJob,
        limits: jobs.JobLimits,
        *,
        if_busy: jobs.IfBusy,
        hold: bool = False,
    ) -> jobs.StartedJob | jobs.SessionNotOpen | jobs.StartRefused | LimitReached:
        assert not new.parent_job_id, "an internal call's job starts with start_job"
        if self._record(new.job_id) is not None:
            return jobs.StartRefused.JOB_EXISTS
        session = await self._sessions.get_session(tenant_id, new.session_id, touch=True)
        if session is None:
            return jobs.StartRefused.SESSION_MISSING
        if not session.state.is_open:
            return jobs.SessionNotOpen(session.state)
        new = replace(new, agent_id=session.agent_id)
        return await self.start_job(tenant_id, new, limits, if_busy=if_busy, hold=hold)

    def _index_job(
        self, tenant_id: str, created_ms: int, job_id: str, limits: jobs.JobLimits
    ) -> None:
        """What the start script does with the tenant's job index: trim, then add."""
        kept_ms = limits.queue_timeout_ms + limits.deadline_ms + limits.retention_ms
        index = self._tenant_jobs.setdefault(tenant_id, [])
        del index[: bisect.bisect_left(index, (created_ms - kept_ms, ""))]
        bisect.insort(index, (created_ms, job_id))
        self._last_start[tenant_id] = created_ms

    async def list_tenant_jobs(
        self,
        tenant_id: str,
        *,
        before: tuple[int, str] | None,
        created_from_ms: int | None,
        created_to_ms: int | None,
        limit: int,
    ) -> list[tuple[int, str]]:
        index = self._tenant_jobs.get(tenant_id, [])
        end = len(index) if before is None else bisect.bisect_left(index, before)
        if created_to_ms is not None:
            end = min(end, bisect.bisect_left(index, (created_to_ms, "")))
        start = 0 if created_from_ms is None else bisect.bisect_left(index, (created_from_ms, ""))
        return list(reversed(index[max(start, end - limit) : end]))

    async def get_jobs(self, tenant_id: str, job_ids: Sequence[str]) -> list[jobs.Job | None]:
        return [await self.get_job(tenant_id, job_id) for job_id in job_ids]

    async def tenants_started_since(self, since_ms: int) -> set[str]:
        return {tenant for tenant, last in self._last_start.items() if last >= since_ms}

    async def activate_job(
        self, tenant_id: str, job_id: str, limits: jobs.JobLimits
    ) -> jobs.ActivateOutcome | LimitReached:
        record = self._record(job_id)
        session_id = record.job.session_id if record is not None else ""
        reading = CapReading()
        if record is not None and record.job.tenant_id == tenant_id:
            reading = self._reading(tenant_id, record.job.service)
        step = job_machine.activate(
            record,
            self._side(tenant_id, session_id),
            tenant_id,
            limits,
            now=self._clock(),
            reading=reading,
        )
        self._apply(tenant_id, session_id, job_id, step.effects)
        return step.outcome

    async def renew_handoff(self, tenant_id: str, job_id: str, limits: jobs.JobLimits) -> bool:
        step = job_machine.renew_handoff(self._record(job_id), tenant_id, limits, now=self._clock())
        self._apply(tenant_id, "", job_id, step.effects)
        return step.outcome

    async def enqueue_done(self, tenant_id: str, job_id: str) -> None:
        self._apply(
            tenant_id, "", job_id, job_machine.enqueue_done(self._record(job_id), tenant_id).effects
        )

    async def handoff_done(self, tenant_id: str, job_id: str) -> None:
        self._apply(
            tenant_id, "", job_id, job_machine.handoff_done(self._record(job_id), tenant_id).effects
        )

    async def handoffs_done(self, done: Sequence[tuple[str, str]]) -> None:
        for tenant_id, job_id in done:
            await self.handoff_done(tenant_id, job_id)

    async def claim_handoffs(
        self, limits: jobs.JobLimits, *, limit: int
    ) -> list[jobs.HandoffClaim]:
        now = self._clock()
        claims: list[jobs.HandoffClaim] = []
        for job_id in list(self._handoffs):
            if len(claims) >= limit:
                break
            record = self._record(job_id)
            if record is None:
                self._handoffs.pop(job_id, None)
                continue
            job = record.job
            side = self._side(job.tenant_id, job.session_id)
            step = job_machine.claim_handoff(record, side, limits, now=now)
            self._apply(job.tenant_id, job.session_id, job_id, step.effects)
            if step.outcome is not None:
                claims.append(step.outcome)
        return claims

    async def apply_notice(self, notice: jobs.Notice, limits: jobs.JobLimits) -> jobs.NoticeOutcome:
        record = self._record(notice.job_id)
        if record is None:
            return jobs.NoticeOutcome(jobs.Verdict.UNKNOWN_JOB)
        job = record.job
        side = self._side(job.tenant_id, job.session_id)
        step = job_machine.apply_notice(
            record, side, notice, limits, now=self._clock(), parent=self._parent(job)
        )
        event = self._apply(job.tenant_id, job.session_id, job.job_id, step.effects)
        after = step.effects.record
        if after is not None and after.job.state is jobs.JobState.FINISHING:
            claim = job_machine.finishing_claim(after, 1)
            return jobs.NoticeOutcome(
                step.outcome, event, finishing=claim, traceparent=job.traceparent
            )
        if step.outcome is not jobs.Verdict.ACCEPTED:
            return jobs.NoticeOutcome(step.outcome, event)
        return jobs.NoticeOutcome(step.outcome, event, traceparent=job.traceparent)

    async def apply_notices(
        self, notices: Sequence[jobs.Notice], limits: jobs.JobLimits
    ) -> list[jobs.NoticeOutcome | Exception]:
        outcomes: list[jobs.NoticeOutcome | Exception] = []
        for notice in notices:
            try:
                outcomes.append(await self.apply_notice(notice, limits))
            except Exception as exc:  # that notice alone: the others are applied regardless
                outcomes.append(exc)
        return outcomes

    def _parent(self, job: jobs.Job) -> job_machine.ParentSide | None:
        """An internal call's parent job and its session."""
        if not job.parent_job_id:
            return None
        parent = self._record(job.parent_job_id)
        if parent is None:
            return job_machine.ParentSide(None)
        session = self._sessions.peek(parent.job.tenant_id, parent.job.session_id)
        return job_machine.ParentSide(parent, session)

    async def record_plan(
        self,
        tenant_id: str,
        job_id: str,
        plan: OrchestrationPlan,
        steps: Sequence[ServiceCall],
        *,
        outputs: Mapping[str, Any] | None = None,
    ) -> list[jobs.SessionEvent] | None:
        record = self._record(job_id)
        step = job_machine.record_plan(record, tenant_id, plan, steps, outputs)
        if not step.outcome or record is None:
            return None
        return self._apply_all(tenant_id, record.job.session_id, job_id, step.effects)

    async def finish_job(
        self, tenant_id: str, job_id: str, draft: jobs.EventDraft, limits: jobs.JobLimits
    ) -> tuple[jobs.FinishOutcome, jobs.SessionEvent | None]:
        record = self._record(job_id)
        session_id = record.job.session_id if record is not None else ""
        side = self._side(tenant_id, session_id)
        step = job_machine.finish(record, side, tenant_id, draft, limits, now=self._clock())
        return step.outcome, self._apply(tenant_id, session_id, job_id, step.effects)

    async def get_job(self, tenant_id: str, job_id: str) -> jobs.Job | None:
        record = self._record(job_id)
        return record.job if record is not None and record.job.tenant_id == tenant_id else None

    async def count_unfinished_of(self, tenant_id: str) -> dict[jobs.JobState, int]:
        counts = dict.fromkeys(jobs.UNFINISHED_STATES, 0)
        for job_id in list(self._unfinished):
            record = self._record(job_id)
            job = record.job if record is not None else None
            if job is not None and job.tenant_id == tenant_id and not job.state.is_final:
                counts[job.state] += 1
        return counts

    async def count_unfinished(self) -> dict[jobs.JobState, int]:
        counts = dict.fromkeys(jobs.UNFINISHED_STATES, 0)
        for job_id in list(self._unfinished):
            record = self._record(job_id)  # drops a record that expired unfinished
            if record is None or record.job.state.is_final:
                self._unfinished.discard(job_id)
            else:
                counts[record.job.state] += 1
        return counts

    async def reap_expired(self, limits: jobs.JobLimits, *, limit: int) -> list[jobs.SessionEvent]:
        now = self._clock()
        events: list[jobs.SessionEvent] = []
        while self._deadlines and self._deadlines[0][0] <= now and len(events) < limit:
            _, job_id = heapq.heappop(self._deadlines)
            record = self._record(job_id)
            if record is None:
                continue
            job = record.job
            side = self._side(job.tenant_id, job.session_id)
            step = job_machine.reap(record, side, limits, now=now)
            event = self._apply(job.tenant_id, job.session_id, job_id, step.effects)
            if event is not None:
                events.append(event)
        return events

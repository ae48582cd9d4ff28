"""The two job stores make the same transitions: seeded random sequences of operations (starts
with each if-busy choice and held jobs, some with the session read in the same step as a
message's, activations, notices of every kind (tool calls and
workflow steps too) and verdict, cancels and other finishes, time-outs by the reaper, hand-off
renewals, confirmations and claims, jobs with plans that turn FINISHING on completion and are
completed or claimed for their finalize, plan step records) go through the memory store
(domain.job_machine) and the Redis store (its Lua scripts) side by side, and after every step
the outcomes, the new events of every session (kind, job, sequence, data), every job, every
session, the unfinished counts and the tenants' usage must be equal.

Time: the memory store runs on a clock the test moves; Redis takes its own. Every limit is
either LONG (never reached within a run) or SHORT (passed after one tick), and the reaper and
the claims run only right after a tick, so both stores find the same jobs due. A session holds
at most one job with a SHORT limit at a time, so no two of its jobs fall due in one pass (the
stores scan due jobs in different orders: memory by start, Redis by score).

A mismatch names the seed and the step; DIFF_SEED=<seed> reruns that seed alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from redis.asyncio import Redis

from domain.agents import AgentConfig, AgentKind
from domain.ids import new_id
from domain.jobs import (
    EventDraft,
    EventKind,
    HandoffClaim,
    IfBusy,
    Job,
    JobLimits,
    JobState,
    NewJob,
    NoticeEvent,
    NoticeOutcome,
    SessionEvent,
    SessionNotOpen,
    StartedJob,
)
from domain.models import NewSession, Service, TokenUsage, WorkKind
from domain.notices import NoticeInput, NoticeProcessor
from domain.plans import OrchestrationPlan, StepState, plan_for
from domain.ports.events import EventLog
from domain.ports.jobs import JobStore
from domain.ports.sessions import SessionStore
from domain.ports.usage import UsageStore, day_number
from domain.service_caps import MINUTE_MS, LimitKind, LimitReached, ServiceCaps
from registry.backend import BackendConfig, open_backend
from registry.memory_jobs import MemoryEventLog, MemoryJobStore
from registry.memory_sessions import MemorySessionStore
from registry.memory_usage import MemoryUsageStore

SEEDS = [int(os.environ["DIFF_SEED"])] if os.environ.get("DIFF_SEED") else list(range(30))
STEPS = 40
TENANTS = ("acme", "globex")
SESSIONS_PER_TENANT = 2
LONG = 600_000
SHORT = 1
TICK_MS = 15
BASE_LIMITS = JobLimits(
    deadline_ms=LONG,
    heartbeat_ms=LONG,
    retention_ms=LONG,
    queue_timeout_ms=LONG,
    handoff_grace_ms=LONG,
    handoff_attempts=3,
)
# The service of the work of each agent kind's plan.
AGENT_KINDS = {
    Service.QUERY: AgentKind.LLM,
    Service.AGENT_EXECUTION: AgentKind.TOOL_AGENT,
    Service.WORKFLOW_ENGINE: AgentKind.WORKFLOW,
}
TIMERS = ("deadline_ms", "heartbeat_ms", "queue_timeout_ms", "handoff_grace_ms")


@dataclass(slots=True)
class Stores:
    sessions: SessionStore
    jobs: JobStore
    events: EventLog
    usage: UsageStore


class Clock:
    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def memory_stores(clock: Clock) -> Stores:
    events = MemoryEventLog(max_events=1000, ttl_ms=LONG, clock=clock)
    sessions = MemorySessionStore(retention_ms=LONG, clock=clock, on_close=events.session_closed)
    usage = MemoryUsageStore(clock=clock)
    jobs = MemoryJobStore(sessions, events, usage=usage, clock=clock)
    return Stores(sessions, jobs, events, usage)


@pytest.fixture
async def redis_time(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def redis_now_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


# -- normal forms: what must be equal (times are each store's own clock) ---------------------


def plain(data: Any) -> Any:
    return json.loads(json.dumps(data))


def event_form(event: SessionEvent | None) -> Any:
    if event is None:
        return None
    data = plain(event.data)
    if event.kind is EventKind.ACCEPTED:
        data["deadline_ms"] -= event.time_ms  # the first deadline, from now
    elif event.kind is EventKind.TIMED_OUT:
        assert data["deadline_ms"] <= event.time_ms
        data["deadline_ms"] = "passed"
    return (
        event.session_id,
        event.job_id,
        event.sequence,
        event.kind.value,
        event.request_id,
        data,
    )


def is_handoff_failure(event: SessionEvent | None) -> bool:
    error = event.data.get("error") if event is not None else None
    return isinstance(error, dict) and error.get("code") == "handoff_failed"


def job_form(job: Job | None) -> Any:
    if job is None:
        return None
    return (
        job.job_id,
        job.tenant_id,
        job.session_id,
        job.service.value,
        job.kind.value,
        job.state.value,
        job.request_id,
        job.last_notice_sequence,
        job.usage,
        job.agent_id,
        job.model,
        job.cache_key,
        job.keep_final,
        event_form(job.final_event),
        job.plan,
        job.agent,
        bool(job.finishing_ms),
    )


def claim_form(claim: HandoffClaim) -> Any:
    return (
        claim.tenant_id,
        claim.job,
        claim.attempt,
        claim.exhausted,
        claim.requeue,
        claim.accepted_sequence,
        claim.finalize,
        plain(claim.result),
        plain(claim.outputs),
        claim.deadline_ms > 0,  # each store's own clock
    )


def outcome_form(outcome: Any) -> Any:
    if isinstance(outcome, StartedJob):
        return ("started", job_form(outcome.job), event_form(outcome.accepted))
    if isinstance(outcome, NoticeOutcome):
        finishing = claim_form(outcome.finishing) if outcome.finishing else None
        return (outcome.verdict.value, outcome.detail, event_form(outcome.event), finishing)
    if isinstance(outcome, tuple):  # finish_job
        return (outcome[0].value, event_form(outcome[1]))
    if isinstance(outcome, list):  # reaped events or claims, in no particular order
        forms = [
            claim_form(item) if isinstance(item, HandoffClaim) else event_form(item)
            for item in outcome
        ]
        return sorted(forms, key=repr)
    if isinstance(outcome, LimitReached):
        # Until the next minute of each store's own clock, for tokens per minute.
        per_minute = outcome.limit is LimitKind.TOKENS_PER_MINUTE
        retry = "next minute" if per_minute else outcome.retry_after_ms
        return ("limited", outcome.limit.value, outcome.service.value, outcome.cap, retry)
    return outcome


# -- the random operations -------------------------------------------------------------------


@dataclass(slots=True)
class Known:
    tenant_id: str
    session_id: str
    job_id: str
    service: Service


@dataclass(slots=True)
class Run:
    """One seed's sequence of operations over both stores."""

    seed: int
    rng: random.Random
    memory: Stores
    redis: Stores
    clock: Clock
    redis_clock: Redis
    sessions: list[tuple[str, str]]
    jobs: list[Known] = field(default_factory=list)
    # session -> the one job of it that may have a SHORT limit now
    short: dict[str, str] = field(default_factory=dict)
    seen: dict[tuple[str, str], int] = field(default_factory=dict)  # last event read
    history: list[str] = field(default_factory=list)  # the steps so far
    covered: set[str] = field(default_factory=set)  # the FINISHING transitions made
    start_minute: int = 0  # the minute both clocks were in when the run began
    # Draws the limits of starts and activations (apart, so the other draws stay the same).
    caps_rng: random.Random = field(default_factory=random.Random)

    def fail(self, step: int, op: str, what: str, memory: Any, redis: Any) -> None:
        pytest.fail(
            f"seed {self.seed} step {step} ({op}): {what} differs\n"
            f"  memory: {memory!r}\n  redis:  {redis!r}\nsteps:\n" + "\n".join(self.history),
            pytrace=False,
        )

    async def tick(self) -> None:
        """Move both clocks on by TICK_MS: every SHORT limit set before has passed."""
        start = await redis_now_ms(self.redis_clock)
        self.clock.now_ms += TICK_MS
        # Redis's clock cannot be moved or awaited: read it until it has moved on.
        while await redis_now_ms(self.redis_clock) < start + TICK_MS:  # noqa: ASYNC110
            await asyncio.sleep(0.002)

    async def may_be_short(self, known: Known) -> bool:
        """Whether ``known`` may get a SHORT limit (no other job of its session has one)."""
        holder = self.short.get(known.session_id)
        if holder is not None and holder != known.job_id:
            job = await self.memory.jobs.get_job(known.tenant_id, holder)
            if job is not None and not job.state.is_final:
                return False
        return True

    async def holds_short(self, known: Known) -> bool:
        """Whether ``known`` is unfinished and may have a SHORT limit."""
        if self.short.get(known.session_id) != known.job_id:
            return False
        job = await self.memory.jobs.get_job(known.tenant_id, known.job_id)
        return job is not None and not job.state.is_final

    async def limits_for(self, known: Known | None, *timers: str) -> JobLimits:
        """BASE_LIMITS, sometimes with one of ``timers`` SHORT (when the job may have one)."""
        limits = replace(BASE_LIMITS, handoff_attempts=self.rng.choice((1, 2, 3)))
        if known is None or not timers or self.rng.random() < 0.6:
            return limits
        if not await self.may_be_short(known):
            return limits
        self.short[known.session_id] = known.job_id
        return replace(limits, **{self.rng.choice(timers): SHORT})  # type: ignore[arg-type]

    async def with_caps(self, limits: JobLimits) -> JobLimits:
        """``limits``, often with small limits toward the services (domain.service_caps): an
        in-flight cap (a tenant's default or override), and a tokens-per-minute limit while
        both clocks are still in the minute the run began (each store counts the minute of its
        own clock, and the memory clock falls behind Redis's)."""
        rng = self.caps_rng
        if rng.random() < 0.3:
            return limits
        in_flight = rng.choice((0, 1, 1, 2))
        overrides = {rng.choice(TENANTS): rng.choice((0, 1, 2))} if rng.random() < 0.3 else {}
        tokens = 0
        redis_now = await redis_now_ms(self.redis_clock)
        same_minute = (
            redis_now // MINUTE_MS == self.start_minute == self.clock.now_ms // MINUTE_MS
            and redis_now % MINUTE_MS < MINUTE_MS - 5_000
        )
        if same_minute and rng.random() < 0.5:
            tokens = rng.choice((1, 1, 20))
        caps = ServiceCaps(
            in_flight=in_flight,
            in_flight_overrides=overrides,
            tokens_per_minute=tokens,
            retry_after_ms=rng.choice((250, 1_000)),
        )
        return replace(limits, caps=caps)

    def pick_job(self) -> Known | None:
        return self.rng.choice(self.jobs) if self.jobs else None

    def other_tenant(self, tenant_id: str) -> str:
        return next(t for t in TENANTS if t != tenant_id)

    async def step(self, step: int) -> None:
        ops = [
            (self.op_start, 6),
            (self.op_activate, 3),
            (self.op_notice, 8),
            (self.op_finish, 2),
            (self.op_reap, 2),
            (self.op_claim, 2),
            (self.op_renew, 1),
            (self.op_handoff_done, 1),
            (self.op_handoffs_done, 1),
            (self.op_enqueue_done, 1),
            (self.op_close, 0.3),
            (self.op_record_plan, 2),
        ]
        op = self.rng.choices([o for o, _ in ops], weights=[w for _, w in ops])[0]
        await op(step)

    async def both(self, step: int, label: str, call: Any, job_id: str | None = None) -> None:
        """Run ``call(stores)`` on memory, then on Redis, and compare the outcomes, the new
        events, the sessions, the counts and the usage; then the job ``job_id`` names, or every
        job when None (or at the last step)."""
        self.history.append(f"{step} {label}")
        outcome = await call(self.memory)
        got_memory = outcome_form(outcome)
        self.note_coverage(outcome)
        got_redis = outcome_form(await call(self.redis))
        if got_memory != got_redis:
            self.fail(step, label, "the outcome", got_memory, got_redis)
        await self.compare_state(step, label)
        every = job_id is None or step == STEPS - 1
        await self.compare_jobs(step, label, [j for j in self.jobs if every or j.job_id == job_id])

    def note_coverage(self, outcome: Any) -> None:
        if isinstance(outcome, SessionNotOpen):
            self.covered.add("session not open on a message's start")
        if isinstance(outcome, LimitReached):
            self.covered.add(f"limited {outcome.limit.value}")
        if isinstance(outcome, NoticeOutcome) and outcome.finishing is not None:
            self.covered.add("finishing")
        if isinstance(outcome, list):
            for claim in outcome:
                if isinstance(claim, HandoffClaim) and claim.finalize:
                    self.covered.add("finalize exhausted" if claim.exhausted else "finalize")
                if isinstance(claim, SessionEvent) and claim.kind is EventKind.PLAN_STEP:
                    self.covered.add("plan step")

    async def compare_state(self, step: int, label: str) -> None:
        for tenant_id, session_id in self.sessions:
            after = self.seen.get((tenant_id, session_id), 0)
            pages = [
                await stores.events.read_after(tenant_id, session_id, after, limit=1000)
                for stores in (self.memory, self.redis)
            ]
            forms = [[event_form(e) for e in page.events] for page in pages]
            if forms[0] != forms[1]:
                self.fail(step, label, f"the new events of session {session_id}", *forms)
            if pages[0].events:
                self.seen[(tenant_id, session_id)] = pages[0].events[-1].sequence
            sessions = [
                await stores.sessions.get_session(tenant_id, session_id, touch=False)
                for stores in (self.memory, self.redis)
            ]
            session_forms = [
                None if s is None else (s.state.value, s.pending_job_ids, s.message_count, s.usage)
                for s in sessions
            ]
            if session_forms[0] != session_forms[1]:
                self.fail(step, label, f"session {session_id}", *session_forms)
        counts = [await stores.jobs.count_unfinished() for stores in (self.memory, self.redis)]
        if counts[0] != counts[1]:
            self.fail(step, label, "the unfinished counts", *counts)
        today = day_number(self.clock.now_ms)
        for tenant_id in TENANTS:
            days = [
                await stores.usage.usage_days(tenant_id, today - 1, today + 1)
                for stores in (self.memory, self.redis)
            ]
            usage_forms = [[(d.usage, d.agents, d.jobs) for d in found] for found in days]
            if usage_forms[0] != usage_forms[1]:
                self.fail(step, label, f"the usage of {tenant_id}", *usage_forms)

    async def compare_jobs(self, step: int, label: str, jobs: list[Known]) -> None:
        for known in jobs:
            job_forms = [
                job_form(await stores.jobs.get_job(known.tenant_id, known.job_id))
                for stores in (self.memory, self.redis)
            ]
            if job_forms[0] != job_forms[1]:
                self.fail(step, label, f"job {known.job_id}", *job_forms)

    # -- operations --

    async def op_start(self, step: int) -> None:
        rng = self.rng
        tenant_id, session_id = rng.choice(self.sessions)
        existing = [j for j in self.jobs if j.session_id == session_id]
        if existing and rng.random() < 0.08:  # the same job id again (redelivered work)
            job_id, service = rng.choice(existing).job_id, rng.choice(list(Service))
        else:
            job_id, service = new_id(), rng.choice(list(Service))
        kind = WorkKind.EMBEDDING if service is Service.EMBEDDING else WorkKind.LLM_QUERY
        agent_kind = AGENT_KINDS.get(service)
        plan: OrchestrationPlan | None = None
        agent: AgentConfig | None = None
        if agent_kind is not None and rng.random() < 0.6:  # a job of an agent's plan
            agent = AgentConfig(tenant_id, "agent-1", agent_kind, rng.randint(1, 3), model="m1")
            plan = plan_for(kind, agent, now_ms=1_000)
        elif rng.random() < 0.2:  # a one-call plan (nothing after the work)
            plan = OrchestrationPlan(calls=(plan_for(WorkKind.EMBEDDING, None, now_ms=0).calls))
        new = NewJob(
            job_id,
            session_id,
            f"agent-{rng.randint(1, 2)}",
            service,
            kind,
            f"content {step}",
            f"req-{step}",
            model=rng.choice(("", "m1")),
            collections=("c1",) if rng.random() < 0.3 else (),
            keep_final=rng.random() < 0.4,
            plan=plan,
            agent=agent,
        )
        known = Known(tenant_id, session_id, job_id, service)
        limits = await self.with_caps(await self.limits_for(known, *TIMERS))
        if_busy = rng.choice(list(IfBusy))
        hold = rng.random() < 0.2
        # A message's start: the session read in the same step, the job on the session's agent
        # (every third step; drawing it from ``rng`` would change what every seed covers).
        on_session = step % 3 == 0
        if on_session:
            new = replace(new, agent_id="")
        label = (
            f"start {job_id} in {session_id} if_busy={if_busy.value} hold={hold} "
            f"on_session={on_session} {limits}"
        )

        async def call(stores: Stores) -> Any:
            if on_session:
                return await stores.jobs.start_on_session(
                    tenant_id, new, limits, if_busy=if_busy, hold=hold
                )
            return await stores.jobs.start_job(tenant_id, new, limits, if_busy=if_busy, hold=hold)

        await self.both(step, label, call, job_id)
        if not any(j.job_id == job_id for j in self.jobs):
            self.jobs.append(known)

    async def op_activate(self, step: int) -> None:
        known = self.pick_job()
        if known is None:
            return
        tenant_id = known.tenant_id
        if self.rng.random() < 0.1:
            tenant_id = self.other_tenant(tenant_id)
        if await self.holds_short(known):
            # Whatever it answers, a Redis activation scores the job in the deadline and
            # hand-off sets by the activation's limits: with LONG ones, later than a SHORT due
            # or lease, which the reaper and the claims would then miss.
            timer = self.rng.choice(("deadline_ms", "heartbeat_ms"))
            limits = replace(BASE_LIMITS, handoff_grace_ms=SHORT)
            limits = replace(limits, **{timer: SHORT})  # type: ignore[arg-type]
        else:
            limits = await self.limits_for(known, "deadline_ms", "heartbeat_ms", "handoff_grace_ms")
        limits = await self.with_caps(limits)

        async def call(stores: Stores) -> Any:
            return await stores.jobs.activate_job(tenant_id, known.job_id, limits)

        await self.both(
            step, f"activate {known.job_id} as {tenant_id} {limits}", call, known.job_id
        )

    async def op_notice(self, step: int) -> None:
        rng = self.rng
        known = self.pick_job()
        if known is None or rng.random() < 0.05:  # a job nobody started
            known = Known(rng.choice(TENANTS), "", new_id(), rng.choice(list(Service)))
        job = await self.memory.jobs.get_job(known.tenant_id, known.job_id)
        last = job.last_notice_sequence if job is not None else 0
        sequence = rng.choice(
            [None, last + 1, last + 1, last + rng.randint(2, 3)] + ([last] if last else [])
        )
        event = rng.choice(list(NoticeEvent))
        appends = job is not None and job.plan is not None and job.plan.appends_history
        if appends and rng.random() < 0.4:  # more jobs turn FINISHING
            event = NoticeEvent.COMPLETED
        tenant_id = known.tenant_id if rng.random() > 0.08 else self.other_tenant(known.tenant_id)
        service = known.service
        if rng.random() < 0.08:
            service = next(s for s in Service if s is not known.service)
        usage = TokenUsage(rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 20))
        payloads: dict[NoticeEvent, dict[str, Any]] = {
            NoticeEvent.PROGRESS: {"fraction": 0.5, "message": "half"},
            NoticeEvent.DELTA: {"text": f"delta {step}"},
            NoticeEvent.COMPLETED: {"result": {"text": "done"}},
            NoticeEvent.FAILED: {"error": {"code": "boom", "message": "it broke"}},
            NoticeEvent.TOOL_CALL: {
                "call_id": f"call-{step}",
                "name": "calculator",
                "phase": "started",
                "arguments": '{"expression": "2+3"}',
                "result_summary": "",
            },
            NoticeEvent.STEP: {
                "step_id": "retrieve",
                "name": "retrieve",
                "index": rng.randint(0, 2),
                "phase": rng.choice(("started", "finished")),
                "summary": "3 passages",
            },
            # Not about a job: malformed with a job id, and never reaches a store.
            NoticeEvent.AGENT_CHANGED: {},
        }
        data = payloads[event]
        raw = NoticeInput(event, service, known.job_id, tenant_id, sequence, "", data, usage)
        malformed = rng.random()
        if malformed < 0.03:
            raw = replace(raw, sequence=0)
        elif malformed < 0.06:
            raw = NoticeInput.malformed_frame("event: is required", known.job_id)
        # Never a SHORT heartbeat: in service the heartbeat limit is one setting, so a notice
        # only moves a heartbeat deadline later (neither store looks again at a job whose
        # deadline a notice brought forward). A completed one may give a SHORT finalize lease.
        limits = await self.limits_for(None)
        if event is NoticeEvent.COMPLETED and rng.random() < 0.5 and await self.may_be_short(known):
            self.short[known.session_id] = known.job_id
            limits = replace(limits, handoff_grace_ms=SHORT)
        label = (
            f"notice {raw.event} #{raw.sequence} about {raw.job_id} as {raw.tenant_id}/"
            f"{raw.service} {limits}"
        )

        async def call(stores: Stores) -> Any:
            return await NoticeProcessor(stores.jobs, limits).process(raw, None)

        await self.both(step, label, call, known.job_id)

    async def op_finish(self, step: int) -> None:
        known = self.pick_job()
        if known is None:
            return
        finishes: list[tuple[EventKind, dict[str, Any]]] = [
            (EventKind.CANCELLED, {"reason": "asked"}),
            (EventKind.FAILED, {"error": {"code": "dispatch", "message": "no"}}),
            (EventKind.COMPLETED, {"result": {"text": "from the cache"}}),
        ]
        kind, data = self.rng.choice(finishes)
        job = await self.memory.jobs.get_job(known.tenant_id, known.job_id)
        if job is not None and job.state is JobState.FINISHING:
            if self.rng.random() < 0.5:  # its finalize done, as the chat flow completes it
                kind, data = EventKind.COMPLETED, {}
            self.covered.add(f"finish a finishing job {kind.value}")
        tenant_id = known.tenant_id
        if self.rng.random() < 0.1:
            tenant_id = self.other_tenant(tenant_id)
        draft = EventDraft(known.job_id, kind, "ignored", data)

        async def call(stores: Stores) -> Any:
            return await stores.jobs.finish_job(tenant_id, known.job_id, draft, BASE_LIMITS)

        await self.both(
            step, f"finish {known.job_id} {kind.value} as {tenant_id}", call, known.job_id
        )

    async def op_reap(self, step: int) -> None:
        await self.tick()

        async def call(stores: Stores) -> Any:
            return await stores.jobs.reap_expired(BASE_LIMITS, limit=1000)

        await self.both(step, "tick, reap", call)

    async def op_claim(self, step: int) -> None:
        await self.tick()
        limits = replace(
            BASE_LIMITS,
            handoff_attempts=self.rng.choice((1, 2, 3)),
            # A renewed lease stays SHORT only for jobs that already had one.
            handoff_grace_ms=self.rng.choice((SHORT, LONG)),
        )

        async def call(stores: Stores) -> Any:
            return await stores.jobs.claim_handoffs(limits, limit=1000)

        await self.both(step, f"tick, claim {limits}", call)

    async def op_renew(self, step: int) -> None:
        known = self.pick_job()
        if known is None:
            return
        limits = await self.limits_for(known, "handoff_grace_ms")

        async def call(stores: Stores) -> Any:
            return await stores.jobs.renew_handoff(known.tenant_id, known.job_id, limits)

        await self.both(step, f"renew {known.job_id} {limits}", call, known.job_id)

    async def op_handoff_done(self, step: int) -> None:
        known = self.pick_job()
        if known is None:
            return

        async def call(stores: Stores) -> Any:
            return await stores.jobs.handoff_done(known.tenant_id, known.job_id)

        await self.both(step, f"handoff done {known.job_id}", call, known.job_id)

    async def op_handoffs_done(self, step: int) -> None:
        picked = {j.job_id: j for j in self.rng.sample(self.jobs, min(len(self.jobs), 3))}
        if not picked:
            return
        # Some under another tenant (skipped), and a job id nobody knows.
        done = [
            (self.other_tenant(j.tenant_id) if self.rng.random() < 0.2 else j.tenant_id, j.job_id)
            for j in picked.values()
        ] + [(TENANTS[0], new_id())]

        async def call(stores: Stores) -> Any:
            return await stores.jobs.handoffs_done(done)

        await self.both(step, f"handoffs done {done}", call)

    async def op_enqueue_done(self, step: int) -> None:
        known = self.pick_job()
        if known is None:
            return

        async def call(stores: Stores) -> Any:
            return await stores.jobs.enqueue_done(known.tenant_id, known.job_id)

        await self.both(step, f"enqueue done {known.job_id}", call, known.job_id)

    async def op_record_plan(self, step: int) -> None:
        known = self.pick_job()
        if known is None:
            return
        job = await self.memory.jobs.get_job(known.tenant_id, known.job_id)
        plan = job.plan if job is not None else None
        if plan is None:
            agent = AgentConfig(known.tenant_id, "agent-1", AgentKind.TOOL_AGENT, 1)
            plan = plan_for(WorkKind.LLM_QUERY, agent, now_ms=1_000)
        calls = [c for c in plan.calls if not c.state.is_final]
        changed = []
        for call in self.rng.sample(calls, min(len(calls), self.rng.randint(1, 2))):
            state = self.rng.choice((StepState.RUNNING, StepState.DONE, StepState.FAILED))
            error = {"code": "x", "message": "down"} if state is StepState.FAILED else None
            call = replace(call, state=state, attempts=call.attempts + 1, error=error)
            plan = plan.with_call(call)
            changed.append(call)
        outputs = {"history": [{"role": "user", "content": f"h{step}"}]}
        tenant_id = known.tenant_id
        if self.rng.random() < 0.1:
            tenant_id = self.other_tenant(tenant_id)
        given = outputs if self.rng.random() < 0.5 else None

        async def call_(stores: Stores) -> Any:
            return await stores.jobs.record_plan(
                tenant_id, known.job_id, plan, changed, outputs=given
            )

        await self.both(step, f"record plan {known.job_id} as {tenant_id}", call_, known.job_id)

    async def op_close(self, step: int) -> None:
        tenant_id, session_id = self.rng.choice(self.sessions)

        async def call(stores: Stores) -> Any:
            closed = await stores.sessions.close_session(tenant_id, session_id)
            return None if closed is None else closed.state.value

        await self.both(step, f"close {session_id}", call, "")


async def run_seed(seed: int, redis_url: str, redis_clock: Redis) -> set[str]:
    clock = Clock(await redis_now_ms(redis_clock))
    memory = memory_stores(clock)
    registry = open_backend(
        BackendConfig(
            redis_url=redis_url,
            key_prefix=f"diff{seed}",
            session_retention_ms=LONG,
            event_log_ttl_ms=LONG,
        )
    )
    redis = Stores(registry.sessions, registry.jobs, registry.events, registry.usage)
    try:
        sessions = [(t, new_id()) for t in TENANTS for _ in range(SESSIONS_PER_TENANT)]
        for tenant_id, session_id in sessions:
            for stores in (memory, redis):
                await stores.sessions.create_session(
                    tenant_id, session_id, NewSession("agent-1", "", {}, LONG)
                )
        run = Run(seed, random.Random(seed), memory, redis, clock, redis_clock, sessions)
        run.start_minute = clock.now_ms // MINUTE_MS
        run.caps_rng = random.Random(seed + 1_000)
        for step in range(STEPS):
            await run.step(step)
        return run.covered
    finally:
        await registry.aclose()


@pytest.mark.timeout(120)
async def test_memory_and_redis_stores_make_the_same_transitions(
    redis_url: str, redis_time: Redis
) -> None:
    covered: set[str] = set()
    for seed in SEEDS:
        covered |= await run_seed(seed, redis_url, redis_time)
    if len(SEEDS) > 1:  # the seeds together make every FINISHING transition
        assert covered >= {
            "finishing",
            "finalize",
            "finalize exhausted",
            "plan step",
            "session not open on a message's start",
            "finish a finishing job completed",
            "limited in_flight",
            "limited tokens_per_minute",
        }, covered


async def test_a_kept_job_failed_by_its_claim_keeps_its_final_event(
    backend_url: str | None,
) -> None:
    registry = open_backend(
        BackendConfig(redis_url=backend_url, key_prefix="kept", session_retention_ms=LONG)
    )
    try:
        session_id = new_id()
        await registry.sessions.create_session(
            "acme", session_id, NewSession("agent-1", "", {}, LONG)
        )
        new = NewJob(
            new_id(), session_id, "a", Service.QUERY, WorkKind.LLM_QUERY, "hi", "r", keep_final=True
        )
        # No grace and one attempt: the first claim finds the hand-off interrupted and fails it.
        limits = replace(BASE_LIMITS, handoff_grace_ms=0, handoff_attempts=1)
        await registry.jobs.start_job("acme", new, limits, if_busy=IfBusy.RUN)
        [claim] = await registry.jobs.claim_handoffs(limits, limit=10)
        assert claim.exhausted and claim.job.keep_final
        job = await registry.jobs.get_job("acme", new.job_id)
        assert job is not None and job.final_event is not None
        assert is_handoff_failure(job.final_event)
    finally:
        await registry.aclose()

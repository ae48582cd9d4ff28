"""The chat job flow: a message becomes a job handed to a downstream service, and the job's
events reach every client following the session.

SendMessage: check the session and the tenant's daily token budget, subscribe to the session's
events, record the job (accepted event; the session check is part of the start, one round
trip, when no budget check or plan needs the session first), hand it to the service with the
orchestrator-assigned job id, then stream the job's events until its final one. Because the
job is recorded before the service sees it, a notice can never arrive for a job the
orchestrator does not know yet.

The hand-off is not the caller's: it runs in a task this orchestrator owns, started before the
accepted event is yielded, so a caller that goes away cannot stop it. The job store keeps the
job's work spec and a hand-off lease with the job (renewed while a slow submit goes on) until
the hand-off is confirmed (domain.handoff_upkeep: one loop renews the leases; the service's
first notice confirms it, else a confirmation is written, in batches, a sixth of the grace
later); if this process dies first, any process's ``HandoffRecovery`` loop
(domain.handoff) claims the job when the lease runs out and hands it over again, and fails it
``handoff_failed`` after ``JobLimits.handoff_attempts`` hand-offs (docs/adr/0007).

A session runs its messages in order: a message sent while the session has jobs in flight is
recorded QUEUED behind them (or refused, if the request asks), and background messages are
always queued; queued jobs go through the ``chat`` work queue (domain.queued_chat), whose worker
starts each one when its turn comes. The sender's stream is the same either way.

With the platform's services (``platform``), a message becomes an orchestration plan of the
session's agent (domain.plans, run by domain.plan_runner): the agent is loaded before the job
starts (its version and kind decide the plan, stored with the job), the hand-off task runs the
calls before the work (history, tools) and then hands the work over, and once the service has
completed it the job is FINISHING until its turns are appended to Conversation (``finalize``,
in a task this orchestrator owns; the recovery takes it over if this process dies, see
docs/adr/0010). Without them a message is one call to Query or Embedding.

Embedding work whose (model, text) is in the embedding cache (domain.embedding_cache) takes the
same path, except that the job is completed from the cached result (usage 0) instead of being
handed to the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from domain.agents import AgentConfig
from domain.dispatch import CallContext, Dispatcher, DownstreamError
from domain.embedding_cache import EmbeddingResultCache
from domain.errors import (
    Aborted,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from domain.event_stream import SessionFollower
from domain.handoff_upkeep import HandoffConfirmations, HandoffLeases
from domain.ids import new_id, require_id
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
    SessionEvent,
    SessionNotOpen,
    StartedJob,
    StartRefused,
)
from domain.models import Service, WorkKind
from domain.plan_runner import PlanPorts, PlanRunner, RetryPolicy, call_error, runs_plan
from domain.plans import OrchestrationPlan
from domain.ports.events import EventLog, Feed
from domain.ports.jobs import JobStore
from domain.ports.queue import QueuePriority, WorkQueue
from domain.ports.tracing import NO_TRACING, AttributeValue, Tracing
from domain.queued_chat import QueuedChat
from domain.service_caps import LimitReached, OverLimit
from domain.sessions import SessionManager, require_session_id
from domain.usage import TokenBudget
from domain.worker import Deferred

log = logging.getLogger(__name__)
# What a stream of ChatOrchestrator.follow yields per event (its caller's encoding).
Encoded = TypeVar("Encoded")

# The agent of the sessions the orchestrator makes for itself (a batch's items without a session
# of their own): no agent is configured for it, so their messages are one call, planless.
BATCH_AGENT_ID = "batch"

MAX_CONTENT_CHARS = 64 * 1024
MAX_MODEL_CHARS = 128
MAX_COLLECTIONS = 32
_USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """A SendMessage request, already translated from protobuf."""

    session_id: str
    content: str
    kind: WorkKind = WorkKind.LLM_QUERY
    model: str = ""
    collections: Sequence[str] = field(default_factory=tuple)
    # When the session has jobs in flight: wait behind them (default), refuse, or run anyway.
    if_busy: IfBusy = IfBusy.HOLD
    # Go through the work queue at ``priority`` even when the session is idle.
    background: bool = False
    priority: QueuePriority = QueuePriority.NORMAL


def require_job_id(value: str, field: str = "job_id") -> str:
    return require_id(value, field, "job id")


def validate_message(message: ChatMessage) -> None:
    violations: list[FieldViolation] = []
    try:
        require_session_id(message.session_id)
    except InvalidArgument as exc:
        violations.extend(exc.violations)
    if not message.content.strip():
        violations.append(FieldViolation("content", "is required"))
    elif len(message.content) > MAX_CONTENT_CHARS:
        violations.append(FieldViolation("content", f"exceeds {MAX_CONTENT_CHARS} characters"))
    if len(message.model) > MAX_MODEL_CHARS:
        violations.append(FieldViolation("model", f"exceeds {MAX_MODEL_CHARS} characters"))
    if message.collections and message.kind is not WorkKind.RAG_QUERY:
        violations.append(FieldViolation("collections", "is only allowed for RAG queries"))
    if len(message.collections) > MAX_COLLECTIONS:
        violations.append(FieldViolation("collections", f"has more than {MAX_COLLECTIONS}"))
    if violations:
        raise InvalidArgument(violations)


def new_job(
    cache: EmbeddingResultCache | None,
    job_id: str,
    session_id: str,
    agent_id: str,
    message: ChatMessage,
    request_id: str,
    *,
    priority: QueuePriority = QueuePriority.NORMAL,
    keep_final: bool = False,
    plan: OrchestrationPlan | None = None,
    agent: AgentConfig | None = None,
    traceparent: str | None = None,
    parent_job_id: str = "",
) -> NewJob:
    """The job a message asks for on its (open) session, in the trace of ``traceparent`` (the
    accepting call's); an embedding's result is cached under its key when ``cache`` is on. An
    internal call's child job (domain.internal_calls) is made the same way, for its
    ``parent_job_id``."""
    cacheable = cache is not None and cache.enabled and message.kind is WorkKind.EMBEDDING
    return NewJob(
        job_id=job_id,
        session_id=session_id,
        agent_id=agent_id,
        service=plan.run_service if plan is not None else Service.for_kind(message.kind),
        kind=message.kind,
        content=message.content,
        request_id=request_id,
        model=message.model,
        # Where a completed result goes (a cache hit completes the job and fills nothing).
        cache_key=cache.key_for(message.model, message.content) if cache and cacheable else "",
        collections=tuple(message.collections),
        keep_final=keep_final,
        priority=priority,
        plan=plan,
        agent=agent,
        traceparent=traceparent or "",
        parent_job_id=parent_job_id,
    )


class ChatOrchestrator:
    """Sends messages, follows sessions and cancels jobs, for one tenant per call."""

    def __init__(
        self,
        sessions: SessionManager,
        jobs: JobStore,
        events: EventLog,
        dispatcher: Dispatcher,
        limits: JobLimits,
        *,
        budget: TokenBudget | None = None,
        embedding_cache: EmbeddingResultCache | None = None,
        queue: WorkQueue | None = None,
        idle_check_s: float = 30.0,
        platform: PlanPorts | None = None,
        plan_retry: RetryPolicy | None = None,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        """``queue`` is the ``chat`` work queue that queued jobs go through; without one,
        background messages are refused and busy sessions run messages side by side.
        ``platform``: the services plans call; without them a message is one call.
        ``tracing``: the hand-offs and finalizes are spans in their job's trace (the job
        stores the trace context it was accepted under, ``CallContext.traceparent``)."""
        self._tracing = tracing
        self._sessions = sessions
        self._jobs = jobs
        self._events = events
        self._dispatcher = dispatcher
        self._limits = limits
        self._budget = budget
        self._cache = embedding_cache
        self._queue = queue
        self._idle_check_s = idle_check_s
        # Hand-offs in progress in this process (owned here, not by any caller's stream).
        self._handoffs: set[asyncio.Task[None]] = set()
        # Their leases (one renewal loop for all) and their confirmations (coalesced).
        self._leases = HandoffLeases(jobs, limits)
        # Written a sixth of the grace after the submit returned (the lease has at least half
        # of it left then), unless the service's first notice confirmed the hand-off first.
        self._confirmations = HandoffConfirmations(jobs, delay_s=limits.handoff_grace_ms / 6000)
        self._plans = (
            PlanRunner(jobs, dispatcher, platform, limits, retry=plan_retry)
            if platform is not None
            else None
        )

    async def send(self, ctx: CallContext, message: ChatMessage) -> AsyncIterator[SessionEvent]:
        """Start a job for the message and yield its events, ending with its final one."""
        validate_message(message)
        if message.background and self._queue is None:
            raise Unavailable("background work is not available: no work queue is configured")
        tenant_id = ctx.tenant_id
        session_id = message.session_id
        # The session is read in the start's round trip (JobStore.start_on_session), unless
        # something must come between the two: the tenant's token budget check, or a plan,
        # which is made from the session's agent.
        read_with_start = (self._plans is None or message.kind is WorkKind.EMBEDDING) and (
            self._budget is None or not self._budget.applies(tenant_id)
        )
        if read_with_start:
            agent_id = ""  # the session's, set by the start
            plan, agent = None, None
        else:
            session = await self._sessions.get_open(tenant_id, session_id)
            if self._budget is not None:
                await self._budget.check(tenant_id)
            agent_id = session.agent_id
            plan, agent = await self._plan(ctx, agent_id, message)
        job = new_job(
            self._cache,
            new_id(),
            session_id,
            agent_id,
            message,
            ctx.request_id,
            priority=message.priority,
            plan=plan,
            agent=agent,
            traceparent=ctx.traceparent,
        )
        if_busy = message.if_busy
        if if_busy is IfBusy.HOLD and self._queue is None:
            if_busy = IfBusy.RUN
        async with self._events.subscribe(tenant_id, session_id) as feed:
            if read_with_start:
                started = await self._jobs.start_on_session(
                    tenant_id, job, self._limits, if_busy=if_busy, hold=message.background
                )
                if isinstance(started, SessionNotOpen):
                    raise FailedPrecondition(f"session {session_id} is {started.state.value}")
                if isinstance(started, StartedJob):
                    job = replace(job, agent_id=started.job.agent_id)
            else:
                started = await self._jobs.start_job(
                    tenant_id, job, self._limits, if_busy=if_busy, hold=message.background
                )
            if isinstance(started, StartRefused):
                raise _refusal(started, session_id)
            if isinstance(started, LimitReached):
                # Interactive: refused now (RetryInfo, QuotaFailure); nothing was recorded.
                raise started.error(tenant_id)
            if started.queued:
                # Shielded: a caller going away does not leave the job off the work queue (and
                # if this process dies first, the recovery enqueues it, see ``_enqueue``).
                await asyncio.shield(self._owned(self._enqueue(ctx, job, started)))
            else:
                # Before the caller sees `accepted`: whatever the caller does next, the job
                # reaches its service (or fails with a reason).
                self._hand_off_soon(ctx, job, deadline_ms=started.job.deadline_ms)
            yield started.accepted
            # The feed was subscribed before the job existed, so every later event arrives on
            # it: no initial read of the log (a gap or lag still triggers one). The job's
            # events are picked here rather than through ``_job_events``: one generator layer
            # less per event on the chat path.
            job_id = job.job_id
            follower = self._follower(feed, tenant_id, session_id)
            follower.still_there = lambda: self._job_exists(tenant_id, job_id)
            async for event in follower.events(started.accepted.sequence, catch_up=False):
                if event.job_id == job_id:
                    yield event
                    if event.kind.is_final:
                        return
            await self._raise_if_lost(tenant_id, job_id)

    async def _plan(
        self, ctx: CallContext, agent_id: str, message: ChatMessage
    ) -> tuple[OrchestrationPlan | None, AgentConfig | None]:
        """The plan of a message on ``session`` and the agent it was made from (both None
        without the platform's services, and for an embedding: its one call, the work, is what
        a job without a plan does, and GetTask shows it the same, domain.jobs.plan_of)."""
        if self._plans is None or agent_id == BATCH_AGENT_ID or message.kind is WorkKind.EMBEDDING:
            return None, None
        return await self._plans.plan(message.kind, agent_id, ctx)

    def _follower(self, feed: Feed, tenant_id: str, session_id: str) -> SessionFollower:
        return SessionFollower(
            self._events,
            feed,
            tenant_id,
            session_id,
            still_open=lambda: self._is_open(tenant_id, session_id),
            idle_check_s=self._idle_check_s,
        )

    async def _job_events(
        self, feed: Feed, tenant_id: str, job_id: str, after: int, *, catch_up: bool
    ) -> AsyncIterator[SessionEvent]:
        """The job's events on the session after ``after``, up to and including its final one
        (fewer if the session closes first)."""
        follower = self._follower(feed, tenant_id, feed.key[1])
        follower.still_there = lambda: self._job_exists(tenant_id, job_id)
        async for event in follower.events(after, catch_up=catch_up):
            if event.job_id != job_id:
                continue
            yield event
            if event.kind.is_final:
                return
        await self._raise_if_lost(tenant_id, job_id)

    async def _job_exists(self, tenant_id: str, job_id: str) -> bool:
        return await self._jobs.get_job(tenant_id, job_id) is not None

    async def _raise_if_lost(self, tenant_id: str, job_id: str) -> None:
        """After the events of a job ended without its final one: never end quietly when the
        job's record is gone."""
        if await self._jobs.get_job(tenant_id, job_id) is None:
            raise Aborted(
                f"the record of job {job_id} was lost (the backend lost its data, or a Redis "
                "Cluster failover lost what its master had not yet replicated): its outcome "
                "is unknown; send the message again"
            )

    async def _enqueue(self, ctx: CallContext, job: NewJob, started: StartedJob) -> None:
        """Put a queued job on the work queue; if the queue refuses, the job fails with it.
        The start recorded the enqueue as the job's first hand-off, with a lease: if this
        process dies before the enqueue is confirmed, any process's recovery enqueues the job
        again (the item id is the job id, so twice is once)."""
        try:
            await self._put_on_queue(ctx.tenant_id, job, started.accepted.sequence)
        except Unavailable as exc:
            error = {"code": "unavailable", "message": exc.message, "retryable": True}
            await self._fail(ctx.tenant_id, job.job_id, job.request_id, error)
            raise

    async def _put_on_queue(self, tenant_id: str, job: NewJob, accepted_sequence: int) -> None:
        """Enqueue a queued job's work item (holding its lease), then confirm the enqueue."""
        assert self._queue is not None  # start_job only queues when there is a queue
        queued = QueuedChat(tenant_id, accepted_sequence, job)
        queue = self._queue
        await self._leases.holding(
            tenant_id, job.job_id, queue.enqueue([queued.work_item(job.priority)])
        )
        try:
            await self._jobs.enqueue_done(tenant_id, job.job_id)
        except Unavailable as exc:
            # Harmless: the recovery enqueues it once more (a no-op), or its activation
            # confirms it.
            log.info("job %s enqueued; marking it so failed: %s", job.job_id, exc)

    async def _requeue(self, claim: HandoffClaim) -> None:
        """Recovery of a queued job whose enqueue was interrupted: enqueue it again. If that
        cannot finish either, its lease runs out and the recovery tries again."""
        job = claim.job
        try:
            await self._put_on_queue(claim.tenant_id, job, claim.accepted_sequence)
        except Exception as exc:
            log.warning(
                "enqueue of queued job %s (attempt %d) did not finish: %s: %s; it is enqueued "
                "again when its lease runs out",
                job.job_id,
                claim.attempt,
                type(exc).__name__,
                exc,
            )

    async def run_queued(
        self, queued: QueuedChat, traceparent: str | None = None
    ) -> SessionEvent | None:
        """Run a queued job when its turn comes and return its final event (the ``chat`` work
        queue's handler, via domain.queued_chat). None when there was nothing to run: the job
        already ended, or it is unknown. ``traceparent``: the trace context its turn runs
        under (the worker's span; default: the job's own)."""
        tenant_id, job_id = queued.tenant_id, queued.job.job_id
        ctx = CallContext(
            tenant_id=tenant_id,
            request_id=queued.job.request_id,
            traceparent=traceparent or queued.job.traceparent or None,
        )
        async with self._events.subscribe(tenant_id, queued.job.session_id) as feed:
            while True:
                outcome = await self._jobs.activate_job(tenant_id, job_id, self._limits)
                if outcome is ActivateOutcome.WAIT:
                    await self._until_a_job_ends(feed)
                    continue
                break
            if isinstance(outcome, LimitReached):
                # It stays QUEUED; its work item waits in the queue (this delivery not
                # counted) and is delivered again once the limit may allow it.
                raise Deferred(
                    outcome.retry_after_ms,
                    f"tenant {tenant_id} is at its {outcome.limit.value} limit toward "
                    f"{outcome.service.value}",
                )
            if outcome in (ActivateOutcome.FINAL, ActivateOutcome.UNKNOWN_JOB):
                return None
            if outcome is ActivateOutcome.SESSION_NOT_OPEN:
                reason = {"reason": "the session closed before the job's turn came"}
                draft = EventDraft(job_id, EventKind.CANCELLED, queued.job.request_id, reason)
                _, event = await self._jobs.finish_job(tenant_id, job_id, draft, self._limits)
                return event
            # STARTED now: handed over like any job (in a task of its own, with a lease that
            # any process's hand-off recovery takes over if this one dies). ALREADY_STARTED by
            # an earlier delivery that died around the hand-off: a job still PENDING is handed
            # over again (at least once; its service reports under the same job id), a RUNNING
            # one only followed.
            if outcome is ActivateOutcome.STARTED or await self._is_pending(tenant_id, job_id):
                self._hand_off_soon(ctx, queued.job)
            try:
                async for event in self._job_events(
                    feed, tenant_id, job_id, queued.accepted_sequence, catch_up=True
                ):
                    if event.kind.is_final:
                        return event
            except Aborted as exc:
                log.warning("queued job %s dropped: %s", job_id, exc.message)
        return None

    async def _is_pending(self, tenant_id: str, job_id: str) -> bool:
        record = await self._jobs.get_job(tenant_id, job_id)
        return record is not None and record.state is JobState.PENDING

    async def fail_queued(self, queued: QueuedChat, message: str) -> None:
        """End a queued job that its work queue gave up on as failed (if still unfinished)."""
        error = {"code": "dead_lettered", "message": message, "retryable": True}
        await self._fail(queued.tenant_id, queued.job.job_id, queued.job.request_id, error)

    async def _fail(
        self, tenant_id: str, job_id: str, request_id: str, error: dict[str, Any]
    ) -> None:
        """End an unfinished job as failed with ``error`` (a no-op for a finished one)."""
        draft = EventDraft(job_id, EventKind.FAILED, request_id, {"error": error})
        await self._jobs.finish_job(tenant_id, job_id, draft, self._limits)

    async def _until_a_job_ends(self, feed: Feed) -> None:
        """Wait until the session's feed shows a final event (or may have missed one), or the
        idle check interval passes."""
        while await feed.wait(self._idle_check_s):
            events = feed.drain()
            if feed.lagging or feed.recheck or feed.closed or any(e.kind.is_final for e in events):
                # The caller reads the job again (which a recheck asks for).
                feed.clear_lagging()
                feed.clear_recheck()
                return

    def _owned(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` in a task this orchestrator tracks (see ``drain``)."""
        task = asyncio.create_task(work)
        self._handoffs.add(task)
        task.add_done_callback(self._handoffs.discard)
        return task

    def start_handoff(self, ctx: CallContext, job: NewJob, *, deadline_ms: int) -> None:
        """Hand a job started outside the chat flow (an internal call's child job,
        domain.internal_calls) to its service, as a chat's: in a task this orchestrator owns,
        under the job's hand-off lease, recovered by any process if this one dies."""
        self._hand_off_soon(ctx, job, deadline_ms=deadline_ms)

    def job_events(
        self, feed: Feed, tenant_id: str, job_id: str, after: int, *, catch_up: bool
    ) -> AsyncIterator[SessionEvent]:
        """The job's events on the feed's session after ``after``, up to its final one."""
        return self._job_events(feed, tenant_id, job_id, after, catch_up=catch_up)

    def _hand_off_soon(
        self,
        ctx: CallContext,
        job: NewJob,
        attempt: int = 1,
        outputs: Mapping[str, Any] | None = None,
        *,
        deadline_ms: int = 0,
    ) -> None:
        """Hand a started job over in a task owned by this orchestrator (``outputs``: what the
        plan's finished pre-steps recorded, from a claim; ``deadline_ms``: the job's, when
        known, which bounds a plan's retries)."""
        # The caller's deadline bounds its stream, not the hand-off.
        ctx = CallContext(ctx.tenant_id, ctx.request_id, traceparent=ctx.traceparent)
        task = self._owned(self._hand_off(ctx, job, attempt, outputs, deadline_ms))
        task.set_name(f"handoff-{job.job_id}")

    async def _hand_off(
        self,
        ctx: CallContext,
        job: NewJob,
        attempt: int,
        outputs: Mapping[str, Any] | None,
        deadline_ms: int,
    ) -> None:
        """Launch the job holding its hand-off lease, then mark the hand-off done. A hand-off
        that cannot finish (the registry unreachable, an unexpected error, this process
        stopping) leaves the lease to run out: any process's recovery then redoes it."""
        attributes: dict[str, AttributeValue] = {
            "orchestrator.job_id": job.job_id,
            "orchestrator.service": job.service.value,
            "orchestrator.attempt": attempt,
        }
        confirmations = self._confirmations
        confirmations.begin(job.job_id)
        try:
            with self._tracing.job_span(
                "hand over job", ctx.traceparent, attributes=attributes
            ) as traceparent:
                ctx = replace(ctx, traceparent=traceparent)
                await self._leases.holding(
                    ctx.tenant_id, job.job_id, self._launch(ctx, job, outputs, deadline_ms)
                )
        except asyncio.CancelledError:
            confirmations.abandon(job.job_id)
            log.warning(
                "hand-off of job %s to the %s service interrupted by shutdown; another process "
                "will hand it over when its lease runs out",
                job.job_id,
                job.service.value,
            )
            raise
        except Exception as exc:
            confirmations.abandon(job.job_id)
            log.warning(
                "hand-off of job %s to the %s service (attempt %d) did not finish: %s: %s; it "
                "is handed over again when its lease runs out",
                job.job_id,
                job.service.value,
                attempt,
                type(exc).__name__,
                exc,
            )
            return
        # Written with other confirmations a little later, unless the service's first notice
        # (which confirms it in its own script) was applied here first. A lost one is
        # harmless: until the first notice the recovery may hand it over once more (at least
        # once).
        confirmations.add(ctx.tenant_id, job.job_id)

    def notice_applied(self, job_id: str) -> None:
        """The notice intake applied a notice of the job (accepted, or the job found
        finished): its hand-off record is gone, so a hand-off of it in this process needs no
        confirmation of its own."""
        self._confirmations.notice_applied(job_id)

    async def recover_handoffs(self, *, limit: int = 100) -> list[HandoffClaim]:
        """Claim the jobs whose hand-off was interrupted (no confirmation within the lease, in
        any process) and hand each over again (a queued job whose enqueue was interrupted:
        enqueue it again). A job that has had every attempt or is past its deadline was
        failed by its claim already. Returns the claims."""
        claims = await self._jobs.claim_handoffs(self._limits, limit=limit)
        for claim in claims:
            job = claim.job
            if claim.finalize:
                self._recover_finalize(claim)
                continue
            if claim.exhausted:
                log.warning(
                    "job %s failed handoff_failed: its hand-off to the %s service was "
                    "interrupted %d times (or the job is past its deadline)",
                    job.job_id,
                    job.service.value,
                    claim.attempt,
                )
                continue
            if claim.requeue:
                if self._queue is None:  # only processes with the work queue queue jobs
                    continue
                log.warning(
                    "queued job %s: its enqueue on the work queue was interrupted; enqueueing "
                    "it again (attempt %d of %d)",
                    job.job_id,
                    claim.attempt,
                    self._limits.handoff_attempts,
                )
                self._owned(self._requeue(claim)).set_name(f"requeue-{job.job_id}")
                continue
            log.warning(
                "job %s: its hand-off to the %s service was interrupted; handing it over again "
                "(attempt %d of %d)",
                job.job_id,
                job.service.value,
                claim.attempt,
                self._limits.handoff_attempts,
            )
            ctx = CallContext(
                tenant_id=claim.tenant_id,
                request_id=job.request_id,
                traceparent=job.traceparent or None,
            )
            self._hand_off_soon(
                ctx, job, claim.attempt, claim.outputs, deadline_ms=claim.deadline_ms
            )
        return claims

    def _recover_finalize(self, claim: HandoffClaim) -> None:
        job = claim.job
        if claim.exhausted:
            log.warning(
                "job %s failed step_failed: appending its turns was interrupted %d times (or "
                "the job is past its deadline)",
                job.job_id,
                claim.attempt,
            )
            return
        log.warning(
            "job %s: appending its turns was interrupted; finalizing it again (attempt %d of %d)",
            job.job_id,
            claim.attempt,
            self._limits.handoff_attempts,
        )
        self.finalize_soon(claim)

    def finalize_soon(self, claim: HandoffClaim) -> None:
        """Finalize a FINISHING job (append its turns, then complete it) in a task this
        orchestrator owns, holding its finalize lease (the notice intake calls this when a
        completed notice made a job FINISHING). Without the platform's services the lease
        runs out and a process that has them takes it over."""
        if self._plans is None:
            log.warning(
                "job %s is finishing but this process has no Conversation service to append "
                "its turns; another process takes it over when its lease runs out",
                claim.job.job_id,
            )
            return
        self._owned(self._finalize(claim)).set_name(f"finalize-{claim.job.job_id}")

    async def _finalize(self, claim: HandoffClaim) -> None:
        assert self._plans is not None
        job = claim.job
        attributes: dict[str, AttributeValue] = {
            "orchestrator.job_id": job.job_id,
            "orchestrator.attempt": claim.attempt,
        }
        try:
            # In the job's trace: under the span of the notice that made the job FINISHING
            # when it runs in that notice's task (its span is current), else under the job's.
            with self._tracing.job_span(
                "finalize job", job.traceparent or None, attributes=attributes
            ) as traceparent:
                finalizing = self._plans.finalize(claim, traceparent)
                await self._leases.holding(claim.tenant_id, job.job_id, finalizing)
        except asyncio.CancelledError:
            log.warning(
                "finalize of job %s interrupted by shutdown; another process finalizes it when "
                "its lease runs out",
                job.job_id,
            )
            raise
        except Exception as exc:
            log.warning(
                "finalize of job %s (attempt %d) did not finish: %s: %s; it is finalized again "
                "when its lease runs out",
                job.job_id,
                claim.attempt,
                type(exc).__name__,
                exc,
            )

    async def drain(self, timeout_s: float) -> None:
        """Shutdown: give the hand-offs in progress up to ``timeout_s`` to finish, then cancel
        the rest (their leases run out and another process redoes them)."""
        loop = asyncio.get_running_loop()
        timeout_s = max(timeout_s, 0.0)
        ends_at = loop.time() + timeout_s
        tasks = set(self._handoffs)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        await self._leases.aclose()
        # The confirmations of the hand-offs that finished (bounded like the hand-offs).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._confirmations.flush(), timeout=max(ends_at - loop.time(), 1.0)
            )

    async def _launch(
        self, ctx: CallContext, job: NewJob, outputs: Mapping[str, Any] | None, deadline_ms: int
    ) -> None:
        """Complete a started job from the embedding cache, or run its plan up to the
        hand-over of its work, or hand it to its service."""
        if job.cache_key and self._cache is not None:
            cached = await self._cache.lookup(ctx.tenant_id, job.cache_key)
            if cached is not None:
                await self._complete_from_cache(ctx, job, cached)
                return
        if self._plans is not None and runs_plan(job):
            await self._plans.hand_over(ctx, job, outputs, deadline_ms=deadline_ms)
            return
        try:
            await self._dispatcher.submit(job.work(ctx.tenant_id), ctx)
        except DownstreamError as exc:
            log.warning("job %s not handed to %s: %s", job.job_id, job.service.value, exc)
            await self._fail(ctx.tenant_id, job.job_id, job.request_id, call_error(exc))
        # The job turns RUNNING with the service's first notice (no extra round trip here).

    async def _complete_from_cache(
        self, ctx: CallContext, job: NewJob, result: dict[str, Any]
    ) -> None:
        """Complete the job with a cached result, as its service would have (usage 0)."""
        data = {"result": result, "usage": dict.fromkeys(_USAGE_FIELDS, 0)}
        draft = EventDraft(job.job_id, EventKind.COMPLETED, job.request_id, data)
        await self._jobs.finish_job(ctx.tenant_id, job.job_id, draft, self._limits)

    async def _is_open(self, tenant_id: str, session_id: str) -> bool:
        session = await self._sessions.peek(tenant_id, session_id)
        return session is not None and session.state.is_open

    async def session_is_open(self, tenant_id: str, session_id: str) -> bool:
        """Whether the session still accepts work (read without sliding its expiry)."""
        return await self._is_open(tenant_id, session_id)

    async def run_once(
        self,
        ctx: CallContext,
        message: ChatMessage,
        job_id: str,
        *,
        likely_new: bool = False,
        session_agent: str | None = None,
    ) -> AsyncIterator[SessionEvent]:
        """Run ``message`` as the job ``job_id``, once however often this is called: work
        that is delivered at least once (a batch item) derives the id from its own identity
        (domain.ids.derived_id). The first call starts the job (running beside any other job of
        the session; its final event is kept with the job), hands it to its service and yields
        its accepted event. A later call (a redelivery after a worker died) starts nothing: it
        follows the job, handing it to its service again while it is still PENDING (the
        earlier delivery may have died before the hand-off: at least once, under the same id;
        the job takes one final event). Ends with the job's final event, or without it when
        the session closes first.

        Fewer round trips for a caller that knows more (a batch item): ``likely_new`` (a
        first delivery) starts the job without reading it first (an existing one is read
        when the start finds it); ``session_agent`` (the agent of the session, when the
        caller made the session itself and keeps it alive) starts it without reading the
        session (the start still refuses a missing or closed one)."""
        validate_message(message)
        require_job_id(job_id)
        tenant_id = ctx.tenant_id
        async with self._events.subscribe(tenant_id, message.session_id) as feed:
            fresh = False  # whether this call started the job
            job = None if likely_new else await self._jobs.get_job(tenant_id, job_id)
            if job is None:
                if session_agent is None:
                    session = await self._sessions.get_open(tenant_id, message.session_id)
                    session_id, agent_id = session.session_id, session.agent_id
                else:
                    session_id, agent_id = message.session_id, session_agent
                if self._budget is not None:
                    await self._budget.check(tenant_id)
                plan, agent = await self._plan(ctx, agent_id, message)
                new = new_job(
                    self._cache,
                    job_id,
                    session_id,
                    agent_id,
                    message,
                    ctx.request_id,
                    keep_final=True,
                    plan=plan,
                    agent=agent,
                    traceparent=ctx.traceparent,
                )
                started = await self._jobs.start_job(
                    tenant_id, new, self._limits, if_busy=IfBusy.RUN
                )
                if isinstance(started, StartedJob):
                    # Handed over (in a task this orchestrator owns) before the accepted event
                    # goes out: a consumer that stops at that event cannot hold it back.
                    fresh = True
                    self._hand_off_soon(ctx, new, deadline_ms=started.job.deadline_ms)
                    yield started.accepted
                elif isinstance(started, LimitReached):
                    # Nothing recorded: the caller (a work queue handler) waits and retries.
                    raise OverLimit(started, tenant_id)
                elif started is not StartRefused.JOB_EXISTS:
                    raise _refusal(started, session_id)
                elif likely_new:
                    # Not new after all (an earlier delivery was given back): as if read.
                    job = await self._jobs.get_job(tenant_id, job_id)
                # else another delivery started it just now: follow it.
            if job is not None and job.state is JobState.PENDING:
                again = job.handed_again(message.content, message.collections)
                log.info("job %s is still pending: handing it to %s again", job_id, job.service)
                self._hand_off_soon(ctx, again)
            final = await self._final_event(feed, tenant_id, job_id, read_first=not fresh)
            if final is not None:
                yield final

    async def _final_event(
        self, feed: Feed, tenant_id: str, job_id: str, *, read_first: bool
    ) -> SessionEvent | None:
        """The job's final event: from the session's feed (subscribed before the job was
        started or read), or kept with the job, read first (``read_first``: the job was not
        started just now) and again whenever the feed may have missed it. None when the job is
        unknown, or the session closed with the job unfinished."""
        read = read_first
        while True:
            if read:
                job = await self._jobs.get_job(tenant_id, job_id)
                if job is None:
                    return None
                if job.state.is_final:
                    return job.final_event or _unkept_final(job)
            read = True
            if not await feed.wait(self._idle_check_s):
                if not await self._is_open(tenant_id, feed.key[1]):
                    return None
                continue  # nothing for a while: read the job again
            for event in feed.drain():
                if event.job_id == job_id and event.kind.is_final:
                    return event
            if feed.lagging or feed.recheck:  # events dropped, or data lost: read the job again
                feed.clear_lagging()
                feed.clear_recheck()
                continue
            if feed.closed:
                job = await self._jobs.get_job(tenant_id, job_id)
                if job is not None and job.state.is_final:
                    return job.final_event or _unkept_final(job)
                return None
            read = False

    async def follow(
        self,
        tenant_id: str,
        session_id: str,
        after: int,
        encode: Callable[[SessionEvent], Encoded | None],
    ) -> AsyncIterator[Encoded]:
        """Yield the session's events after ``after``, then live ones, until it closes; each
        as ``encode`` gives it (one it gives None for is skipped). The caller's encoding is
        applied here rather than in a generator of its own around this one: an open stream
        holds one generator frame less, and each event passes one generator less."""
        if after < 0:
            raise InvalidArgument.field("after_sequence", "must not be negative")
        require_session_id(session_id)
        async with self._events.subscribe(tenant_id, session_id) as feed:
            # Read the session once the subscription is in effect, so a close that happens
            # after this read is seen on the feed.
            session = await self._sessions.get(tenant_id, session_id)
            if not session.state.is_open:
                feed.mark_closed()  # replay what is retained, then end
            async for event in self._follower(feed, tenant_id, session_id).events(after):
                encoded = encode(event)
                if encoded is not None:
                    yield encoded
            if await self._sessions.peek(tenant_id, session_id) is None:
                raise Aborted(
                    f"the record of session {session_id} was lost (the backend lost its data)"
                )

    async def cancel(self, ctx: CallContext, session_id: str, job_id: str) -> SessionEvent:
        """Cancel a job in flight; the cancelled event is published to the session."""
        require_session_id(session_id)
        require_job_id(job_id)
        job = await self._jobs.get_job(ctx.tenant_id, job_id)
        if job is None or job.session_id != session_id:
            raise NotFound(f"job {job_id} not found in session {session_id}")
        draft = EventDraft(
            job_id, EventKind.CANCELLED, job.request_id, {"reason": "cancelled by the client"}
        )
        outcome, event = await self._jobs.finish_job(ctx.tenant_id, job_id, draft, self._limits)
        if outcome is FinishOutcome.ALREADY_FINAL:
            raise FailedPrecondition(f"job {job_id} has already finished")
        if outcome is FinishOutcome.UNKNOWN_JOB or event is None:
            raise NotFound(f"job {job_id} not found in session {session_id}")
        if job.state in (JobState.QUEUED, JobState.FINISHING):
            # Never handed to its service (its work item will find it final), or done there.
            return event
        try:
            await self._dispatcher.cancel(job.service, job_id, ctx)
        except DownstreamError as exc:
            # The job is cancelled here whatever the service says; its late notices are
            # rejected as "job finished".
            log.warning("cancel of job %s not delivered to %s: %s", job_id, job.service, exc)
        return event


def _unkept_final(job: Job) -> SessionEvent:
    """The final event of an ended job that was not started to keep it (not one run_once
    started): its state, without a result."""
    error = {
        "code": "result_unavailable",
        "message": f"job {job.job_id} ended {job.state.value}; its result was not kept",
        "retryable": True,
    }
    return SessionEvent(
        session_id=job.session_id,
        job_id=job.job_id,
        sequence=0,
        time_ms=job.updated_at_ms,
        kind=EventKind.FAILED,
        request_id=job.request_id,
        data={"error": error},
    )


def _refusal(refused: StartRefused, session_id: str) -> Exception:
    if refused is StartRefused.SESSION_MISSING:
        return NotFound(f"session {session_id} not found")
    if refused is StartRefused.SESSION_BUSY:
        return FailedPrecondition(
            f"session {session_id} has a job in flight and the request asked to reject"
        )
    return FailedPrecondition(f"session {session_id} is not open")

"""The internal platform API's rules (orchestrator.internal.v1.PlatformService): the LLM and
embedding calls a platform service (Agent Execution, Workflow Engine, ...) makes for the job it
runs, through the orchestrator like every client's work (docs/adr/0011).

Each call is a CHILD JOB of that job (the parent) in the job store, so everything a job has
applies to it: the hand-off and its recovery, the reaper, notices and their verdicts, usage
charging, the budget, and the caps the start script enforces. The child takes its tenant and
agent from the parent (a caller cannot choose them); its id derives from (parent job id,
call id), so a call repeated with the same call id (the caller retried, or either side
restarted) finds the child the first one started and answers its outcome instead of running
and charging it again. Its events go to a hidden session of the parent's (not in the tenant's
session index, so no client stream shows them); the call follows that session's log for the
deltas and the final event. The start script counts the child on its parent (at most
``JobLimits.max_internal_calls``) and refuses it unless the parent is in flight; the child's
completed notice charges the tenant (and the agent) its tokens, like any job, and rolls them up
into the parent job and the parent's session in the same atomic step, so the parent's usage,
its final ``completed`` event, its session's usage and the tenant's usage add up exactly.

An embedding already in the shared embedding cache is answered from it: no child job, no
tokens. GetTask shows each child as an ``internal_call`` step of the parent's plan
(``internal_steps``).

The parent's tenant pays for a call like for its own requests: each call takes one request
from the tenant's rate-limit bucket (``TenantRate``; the edge charged the calling service key's
tenant already), and a call that would start a child is refused once the tenant's daily budget
is spent. Each call runs in an ``internal call`` span in the parent job's trace; the child job
stores that span's trace context, so its hand-off, its downstream call and the notices about it
nest under the call.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from domain.chat import ChatMessage, ChatOrchestrator, new_job
from domain.dispatch import CallContext
from domain.embedding_cache import EmbeddingResultCache
from domain.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from domain.identity import Caller
from domain.ids import derived_id, is_resource_id, is_tenant_id
from domain.jobs import (
    EventKind,
    IfBusy,
    Job,
    JobLimits,
    JobState,
    NewJob,
    SessionEvent,
    StartedJob,
    StartRefused,
)
from domain.models import NewSession, Service, TokenUsage, WorkKind
from domain.plans import StepState
from domain.ports.events import EventLog
from domain.ports.jobs import JobStore
from domain.ports.rate_limits import RateLimiter
from domain.ports.sessions import SessionStore
from domain.ports.tracing import NO_TRACING, AttributeValue, Tracing
from domain.rate_limits import RateLimitRules
from domain.service_caps import LimitReached
from domain.usage import TokenBudget

log = logging.getLogger(__name__)

# Bounds of a call's fields (the edge's outer bounds are looser: these name the field).
CALL_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
MAX_PROMPT_CHARS = 64 * 1024
MAX_MODEL_CHARS = 128
MAX_COLLECTIONS = 32
MAX_COLLECTION_CHARS = 256
MAX_TEXTS = 32
MAX_TEXT_CHARS = 8192

# Calls sessions a process remembers having seen open (older ones are looked up again).
_SESSIONS_SEEN = 10_000

# The plan step GetTask shows for each internal call, and the method by the child's service.
INTERNAL_STEP = "internal_call"
_METHODS = {Service.QUERY: "Complete", Service.EMBEDDING: "Embed"}


@dataclass(frozen=True, slots=True)
class CompletionCall:
    """A Complete or StreamComplete request (not yet validated)."""

    tenant_id: str
    job_id: str
    call_id: str
    prompt: str
    model: str = ""
    collections: Sequence[str] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class EmbedCall:
    """An Embed request (not yet validated)."""

    tenant_id: str
    job_id: str
    call_id: str
    texts: Sequence[str]
    model: str = ""


@dataclass(frozen=True, slots=True)
class Completion:
    call_id: str
    call_job_id: str
    text: str
    model: str
    usage: TokenUsage
    replayed: bool


@dataclass(frozen=True, slots=True)
class Embeddings:
    call_id: str
    vectors: list[list[float]]
    usage: TokenUsage
    cached: int
    replayed: bool


def _common_violations(tenant_id: str, job_id: str, call_id: str) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    if not tenant_id:
        violations.append(FieldViolation("tenant_id", "is required"))
    elif not is_tenant_id(tenant_id):
        violations.append(FieldViolation("tenant_id", "is not a valid tenant id"))
    if not job_id:
        violations.append(FieldViolation("job_id", "is required"))
    elif not is_resource_id(job_id):
        violations.append(FieldViolation("job_id", "is not a job id issued by the orchestrator"))
    if not call_id:
        violations.append(FieldViolation("call_id", "is required"))
    elif not CALL_ID_PATTERN.match(call_id):
        violations.append(
            FieldViolation("call_id", "must be 1 to 64 characters of A-Z a-z 0-9 . _ : -")
        )
    return violations


def _model_violations(model: str) -> list[FieldViolation]:
    if len(model) > MAX_MODEL_CHARS:
        return [FieldViolation("model", f"exceeds {MAX_MODEL_CHARS} characters")]
    return []


def validate_completion(call: CompletionCall) -> None:
    violations = _common_violations(call.tenant_id, call.job_id, call.call_id)
    if not call.prompt.strip():
        violations.append(FieldViolation("prompt", "is required"))
    elif len(call.prompt) > MAX_PROMPT_CHARS:
        violations.append(FieldViolation("prompt", f"exceeds {MAX_PROMPT_CHARS} characters"))
    violations += _model_violations(call.model)
    if len(call.collections) > MAX_COLLECTIONS:
        violations.append(FieldViolation("collections", f"has more than {MAX_COLLECTIONS}"))
    else:
        for i, name in enumerate(call.collections):
            if not name or len(name) > MAX_COLLECTION_CHARS:
                violations.append(
                    FieldViolation(
                        f"collections[{i}]", f"must be 1 to {MAX_COLLECTION_CHARS} characters"
                    )
                )
    if violations:
        raise InvalidArgument(violations)


def validate_embed(call: EmbedCall) -> None:
    violations = _common_violations(call.tenant_id, call.job_id, call.call_id)
    if not call.texts:
        violations.append(FieldViolation("texts", "is required"))
    elif len(call.texts) > MAX_TEXTS:
        violations.append(FieldViolation("texts", f"has more than {MAX_TEXTS}"))
    else:
        for i, text in enumerate(call.texts):
            if not text.strip():
                violations.append(FieldViolation(f"texts[{i}]", "is required"))
            elif len(text) > MAX_TEXT_CHARS:
                violations.append(
                    FieldViolation(f"texts[{i}]", f"exceeds {MAX_TEXT_CHARS} characters")
                )
    violations += _model_violations(call.model)
    if violations:
        raise InvalidArgument(violations)


def child_job_id(parent_job_id: str, call_id: str, index: int | None = None) -> str:
    """The id of the child job that runs ``call_id`` (an Embed: one per text) for a job."""
    name = f"call/{call_id}" if index is None else f"call/{call_id}/{index}"
    return derived_id(parent_job_id, name)


def calls_session_id(parent_job_id: str) -> str:
    """The hidden session whose log carries the events of a job's internal calls."""
    return derived_id(parent_job_id, "internal-calls")


def internal_steps(children: Sequence[Job], first_index: int) -> list[dict[str, Any]]:
    """The ``plan_step`` data (domain.plans.OrchestrationPlan.step_event's shape) GetTask shows
    for a job's internal calls, in the order they started."""
    steps: list[dict[str, Any]] = []
    for i, child in enumerate(sorted(children, key=lambda c: c.created_at_ms)):
        state = StepState.RUNNING
        if child.state is JobState.COMPLETED:
            state = StepState.DONE
        elif child.state.is_final:
            state = StepState.FAILED
        data: dict[str, Any] = {
            "index": first_index + i,
            "name": INTERNAL_STEP,
            "service": child.service.value,
            "method": _METHODS.get(child.service, "Complete"),
            "state": state.value,
            "attempts": 1,
            "started_ms": child.created_at_ms,
        }
        if child.state.is_final:
            data["ended_ms"] = child.updated_at_ms
        final = child.final_event
        if state is StepState.FAILED:
            error = final.data.get("error") if final is not None else None
            data["error"] = (
                dict(error)
                if isinstance(error, Mapping)
                else {
                    "code": child.state.value,
                    "message": f"the call ended {child.state.value}",
                    "retryable": True,
                }
            )
        steps.append(data)
    return steps


def _call_error(event: SessionEvent, call_job_id: str) -> Exception:
    """The status of a call whose child job did not complete."""
    if event.kind is EventKind.TIMED_OUT:
        return DeadlineExceeded(f"internal call {call_job_id} timed out")
    if event.kind is EventKind.CANCELLED:
        return Aborted(f"internal call {call_job_id} was cancelled")
    error = event.data.get("error")
    error = error if isinstance(error, Mapping) else {}
    message = (
        f"internal call {call_job_id} failed ({error.get('code', 'failed')}): "
        f"{error.get('message', '')}"
    )
    if error.get("retryable"):
        return Unavailable(message)
    return FailedPrecondition(message)


def _result(event: SessionEvent) -> Mapping[str, Any]:
    result = event.data.get("result")
    return result if isinstance(result, Mapping) else {}


def _usage(event: SessionEvent) -> TokenUsage:
    usage = event.data.get("usage")
    if not isinstance(usage, Mapping):
        return TokenUsage()
    return TokenUsage(
        int(usage.get("prompt_tokens", 0)),
        int(usage.get("completion_tokens", 0)),
        int(usage.get("total_tokens", 0)),
    )


def _vector(result: Mapping[str, Any]) -> list[float]:
    vectors = result.get("embeddings")
    if isinstance(vectors, list) and vectors and isinstance(vectors[0], list):
        return [float(v) for v in vectors[0]]
    return []


class TenantRate:
    """Takes one request of a tenant's own rate-limit bucket (domain.rate_limits; the same
    bucket its clients' calls draw from) per internal call made for one of its jobs. Like the
    edge it lets calls through when the limiter's backend cannot be reached (logged at most
    once per ``warn_every_s``)."""

    def __init__(
        self, limiter: RateLimiter, rules: RateLimitRules, *, warn_every_s: float = 10.0
    ) -> None:
        self._limiter = limiter
        self._rules = rules
        self._warn_every_s = warn_every_s
        self._warned_at: float | None = None

    async def take(self, tenant_id: str) -> None:
        """Raise ResourceExhausted (RetryInfo, QuotaFailure) when the tenant is over its rate."""
        buckets = self._rules.buckets(tenant_id)
        try:
            decision = await self._limiter.acquire(buckets)
        except Unavailable as exc:
            now = time.monotonic()
            if self._warned_at is None or now - self._warned_at >= self._warn_every_s:
                self._warned_at = now
                log.warning("rate limiter unavailable, letting internal calls through: %s", exc)
            return
        if decision.allowed:
            return
        bucket = decision.limited or buckets[0]
        retry_after_s = decision.retry_after_ms / 1000
        raise ResourceExhausted(
            f"rate limit exceeded for {bucket.subject} (internal calls for its jobs count); "
            f"retry in {retry_after_s:.3f}s",
            retry_after_s=retry_after_s,
            quota_subject=bucket.subject,
            quota_description=f"at most {bucket.rate}",
        )


class InternalCalls:
    """Runs internal calls as child jobs (see the module docstring)."""

    def __init__(
        self,
        sessions: SessionStore,
        jobs: JobStore,
        events: EventLog,
        chat: ChatOrchestrator,
        limits: JobLimits,
        *,
        budget: TokenBudget | None = None,
        embedding_cache: EmbeddingResultCache | None = None,
        rate: TenantRate | None = None,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self._sessions = sessions
        self._jobs = jobs
        self._events = events
        self._chat = chat
        self._limits = limits
        self._budget = budget
        self._cache = embedding_cache
        self._rate = rate
        self._tracing = tracing
        # The calls sessions this process has seen open (they outlive their job's deadline, so
        # stay open while it is in flight): no round trip for a job's later calls.
        self._sessions_seen: OrderedDict[str, None] = OrderedDict()

    async def _parent(self, caller: Caller, tenant_id: str, job_id: str) -> Job:
        """The parent job, if the caller may make calls for it (finished or not); the call
        is charged to its tenant's request rate."""
        parent = await self._jobs.get_job(tenant_id, job_id)
        if parent is None:
            # The same answer for another tenant's job: nothing leaks.
            raise NotFound(f"job {job_id} not found for tenant {tenant_id}")
        if not caller.speaks_for(parent.service):
            raise PermissionDenied(
                f"the key {caller.key_id or '(unnamed)'} does not speak for the "
                f"{parent.service.value} service that runs job {job_id}"
            )
        if self._rate is not None:
            await self._rate.take(parent.tenant_id)
        return parent

    @contextmanager
    def _span(self, parent: Job, ctx: CallContext, method: str, call_id: str) -> Iterator[str]:
        """The call's span in the parent job's trace (current for the block); yields the trace
        context to pass on: the span's, or with tracing off the caller's (else the job's)."""
        attributes: dict[str, AttributeValue] = {
            "orchestrator.job_id": parent.job_id,
            "orchestrator.method": method,
            "orchestrator.call_id": call_id,
        }
        with self._tracing.job_span(
            "internal call", parent.traceparent or None, attributes=attributes
        ) as traceparent:
            if not self._tracing.enabled:
                traceparent = ctx.traceparent or traceparent
            yield traceparent or ""

    async def _may_start(self, parent: Job) -> None:
        if parent.state not in (JobState.PENDING, JobState.RUNNING):
            raise FailedPrecondition(
                f"job {parent.job_id} is not in flight ({parent.state.value}): internal calls "
                "are accepted only for a job its service is running"
            )
        if self._budget is not None:
            await self._budget.check(parent.tenant_id)

    async def _calls_session(self, parent: Job) -> str:
        """The parent's hidden session, created on its first call (it outlives the parent).
        Opened in one atomic round trip (the open one kept, else a new one), so calls that
        start side by side (an Embed's texts) need no lock: they all get the one session."""
        session_id = calls_session_id(parent.job_id)
        if session_id in self._sessions_seen:
            return session_id
        ttl_ms = 2 * self._limits.deadline_ms + self._limits.heartbeat_ms
        new = NewSession(
            agent_id=parent.agent_id, user_id="", metadata={}, ttl_ms=ttl_ms, hidden=True
        )
        await self._sessions.open_session(parent.tenant_id, session_id, new)
        self._sessions_seen[session_id] = None
        if len(self._sessions_seen) > _SESSIONS_SEEN:
            self._sessions_seen.popitem(last=False)
        return session_id

    def _child(self, ctx: CallContext, parent: Job, job_id: str, message: ChatMessage) -> NewJob:
        """The child job that runs ``message`` (on the parent's calls session) for the call."""
        return new_job(
            self._cache,
            job_id,
            message.session_id,
            parent.agent_id,
            message,
            ctx.request_id,
            keep_final=True,
            traceparent=ctx.traceparent,  # the call's span (its notices nest under it)
            parent_job_id=parent.job_id,
        )

    async def _run(
        self, ctx: CallContext, parent: Job, child: NewJob
    ) -> AsyncIterator[tuple[SessionEvent, bool]]:
        """The child's events from its accepted one (or, for a call made before, from the
        start of its retained log, or its kept final event) to its final one; each with
        whether the call had been made before."""
        tenant_id = parent.tenant_id
        existing = await self._jobs.get_job(tenant_id, child.job_id)
        if existing is not None and existing.state.is_final and existing.final_event:
            yield existing.final_event, True
            return
        if existing is None:
            await self._may_start(parent)
            session_id = await self._calls_session(parent)
        else:
            session_id = existing.session_id
        async with self._events.subscribe(tenant_id, session_id) as feed:
            after, replayed = 0, existing is not None
            if existing is None:
                started = await self._jobs.start_job(
                    tenant_id, child, self._limits, if_busy=IfBusy.RUN
                )
                if isinstance(started, StartedJob):
                    self._chat.start_handoff(ctx, child, deadline_ms=started.job.deadline_ms)
                    after = started.accepted.sequence
                    yield started.accepted, False
                elif started is StartRefused.JOB_EXISTS:
                    replayed = True  # the same call, started just now by another request
                elif isinstance(started, LimitReached):
                    raise started.error(tenant_id)  # the tenant's limits toward the service
                else:
                    # A calls session lost with the backend's data is made again next time.
                    self._sessions_seen.pop(session_id, None)
                    raise _refused(started, parent)
            async for event in self._chat.job_events(
                feed, tenant_id, child.job_id, after, catch_up=replayed
            ):
                yield event, replayed
        job = await self._jobs.get_job(tenant_id, child.job_id)
        if job is not None and job.final_event is not None:
            yield job.final_event, True
            return
        raise Aborted(f"internal call {child.job_id} ended without an outcome; call again")

    async def complete(
        self, caller: Caller, ctx: CallContext, call: CompletionCall
    ) -> AsyncGenerator[str | Completion, None]:
        """The completion's deltas (text) as they come, then its Completion."""
        validate_completion(call)
        parent = await self._parent(caller, call.tenant_id, call.job_id)
        kind = WorkKind.RAG_QUERY if call.collections else WorkKind.LLM_QUERY
        job_id = child_job_id(parent.job_id, call.call_id)
        message = ChatMessage(
            calls_session_id(parent.job_id), call.prompt, kind, call.model, call.collections
        )
        with self._span(parent, ctx, "Complete", call.call_id) as traceparent:
            ctx = CallContext(parent.tenant_id, ctx.request_id, ctx.timeout_s, traceparent or None)
            child = self._child(ctx, parent, job_id, message)
            async for event, replayed in self._run(ctx, parent, child):
                if event.kind is EventKind.DELTA:
                    text = event.data.get("text")
                    if isinstance(text, str) and text:
                        yield text
                elif event.kind is EventKind.COMPLETED:
                    result = _result(event)
                    yield Completion(
                        call_id=call.call_id,
                        call_job_id=job_id,
                        text=str(result.get("text", "")),
                        model=str(result.get("model", "")),
                        usage=_usage(event),
                        replayed=replayed,
                    )
                    return
                elif event.kind.is_final:
                    raise _call_error(event, job_id)

    async def embed(self, caller: Caller, ctx: CallContext, call: EmbedCall) -> Embeddings:
        """One vector per text: from the shared cache, or from a child job per text (run side
        by side)."""
        validate_embed(call)
        parent = await self._parent(caller, call.tenant_id, call.job_id)
        with self._span(parent, ctx, "Embed", call.call_id) as traceparent:
            ctx = CallContext(parent.tenant_id, ctx.request_id, ctx.timeout_s, traceparent or None)
            return await self._embed(ctx, parent, call)

    async def _embed(self, ctx: CallContext, parent: Job, call: EmbedCall) -> Embeddings:
        session_id = calls_session_id(parent.job_id)
        cache = self._cache

        async def one(index: int, text: str) -> tuple[list[float], TokenUsage, bool, bool]:
            """(vector, usage, from the cache, replayed)"""
            job_id = child_job_id(parent.job_id, call.call_id, index)
            message = ChatMessage(session_id, text, WorkKind.EMBEDDING, call.model)
            child = self._child(ctx, parent, job_id, message)
            if child.cache_key and cache is not None:
                known = await self._jobs.get_job(parent.tenant_id, job_id)
                cached = (
                    await cache.lookup(parent.tenant_id, child.cache_key) if known is None else None
                )
                if cached is not None:
                    return _vector(cached), TokenUsage(), True, False
            async for event, replayed in self._run(ctx, parent, child):
                if event.kind is EventKind.COMPLETED:
                    return _vector(_result(event)), _usage(event), False, replayed
                if event.kind.is_final:
                    raise _call_error(event, job_id)
            raise Aborted(f"internal call {job_id} ended without an outcome; call again")

        outcomes = await asyncio.gather(*(one(i, t) for i, t in enumerate(call.texts)))
        usage = TokenUsage()
        for _, used, _, _ in outcomes:
            usage = usage + used
        return Embeddings(
            call_id=call.call_id,
            vectors=[vector for vector, _, _, _ in outcomes],
            usage=usage,
            cached=sum(1 for o in outcomes if o[2]),
            replayed=all(o[3] for o in outcomes if not o[2]) and any(not o[2] for o in outcomes),
        )


def _refused(refused: StartRefused, parent: Job) -> Exception:
    if refused is StartRefused.CALL_LIMIT:
        return ResourceExhausted(
            f"job {parent.job_id} has made the most internal calls a job may make",
            quota_subject=f"internal_calls:{parent.job_id}",
            quota_description="internal calls per job",
        )
    if refused is StartRefused.PARENT_NOT_IN_FLIGHT:
        return FailedPrecondition(
            f"job {parent.job_id} is not in flight: internal calls are accepted only for a job "
            "its service is running"
        )
    return Unavailable(f"the internal calls of job {parent.job_id} cannot start ({refused})")

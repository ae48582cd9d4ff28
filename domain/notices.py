"""Notices from the platform's services: validation, application, and the verdict tally a
PublishUpdates stream (or a WebSocket) answers with.

A notice is judged on its own: a malformed one or one about another tenant's job is rejected
and counted, and the stream goes on.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from domain.embedding_cache import EmbeddingResultCache
from domain.errors import DataLoss
from domain.identity import Caller
from domain.ids import is_resource_id, is_tenant_id
from domain.jobs import (
    HandoffClaim,
    JobLimits,
    Notice,
    NoticeEvent,
    NoticeOutcome,
    StepPhase,
    Verdict,
)
from domain.models import Service, TokenUsage
from domain.ports.jobs import JobStore
from domain.ports.tracing import NO_TRACING, Tracing

log = logging.getLogger(__name__)

MAX_LISTED_REJECTIONS = 1000

# Bounds of every notice field, whichever transport it came by (PublishUpdates or the
# WebSocket). A notice beyond one is malformed, and the verdict names the field.
# Sequences and token counts pass through Lua (numbers are doubles) and Redis integer fields:
# 2**53 - 1 is the largest integer both keep exactly.
MAX_SEQUENCE = 2**53 - 1
MAX_TOKENS = 1_000_000_000
MAX_AGENT_ID_CHARS = 128
MAX_MODEL_CHARS = 128
MAX_DELTA_CHARS = 64 * 1024
MAX_STATUS_MESSAGE_CHARS = 1024
MAX_ERROR_CODE_CHARS = 128
MAX_ERROR_MESSAGE_CHARS = 4096
# A result as JSON (text, embeddings and structured data together).
MAX_RESULT_BYTES = 1024 * 1024
# Nesting of a result, the result object itself being level 1. Its structured data becomes a
# google.protobuf.Struct inside every ChatEvent that carries it, and protobuf refuses messages
# nested deeper than 100 levels (each JSON level is two); 24 leaves room for the envelope.
MAX_RESULT_DEPTH = 24
# Tool calls (Agent Execution) and workflow steps (Workflow Engine).
MAX_CALL_ID_CHARS = 128
MAX_TOOL_NAME_CHARS = 128
# A tool call's arguments, as JSON text.
MAX_ARGUMENTS_CHARS = 64 * 1024
MAX_SUMMARY_CHARS = 4096
MAX_STEP_ID_CHARS = 128
MAX_STEP_NAME_CHARS = 128
MAX_STEP_INDEX = 10_000
_PHASES = ", ".join(phase.value for phase in StepPhase)


@dataclass(frozen=True, slots=True)
class NoticeInput:
    """A notice as received, before validation. ``sequence`` None means the sender does not
    number its notices (the seed's JSON form): each one is then applied in arrival order.
    ``problem`` is set when the transport could not translate the notice (a frame that does
    not decode): it fails validation as malformed with that detail."""

    event: NoticeEvent | None
    service: Service | None
    job_id: str
    tenant_id: str
    sequence: int | None
    agent_id: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)
    usage: TokenUsage = field(default_factory=TokenUsage)
    problem: str = ""

    @classmethod
    def malformed_frame(cls, problem: str, job_id: str = "") -> NoticeInput:
        """A notice that could not be read at all; ``problem`` names the field."""
        return cls(None, None, job_id, "", None, problem=problem)


class MalformedNotice(ValueError):
    """A notice field is missing or out of range; the message names the field."""


def validate_notice(raw: NoticeInput) -> Notice:
    if raw.problem:
        raise MalformedNotice(raw.problem)
    if raw.event is None:
        raise MalformedNotice("event: is required")
    if raw.service is None:
        raise MalformedNotice("service: is required")
    if raw.event is NoticeEvent.AGENT_CHANGED:
        raise MalformedNotice("event: agent_changed is not about a job")
    if not raw.job_id:
        raise MalformedNotice("job_id: is required")
    if not is_resource_id(raw.job_id):
        raise MalformedNotice("job_id: is not a job id issued by the orchestrator")
    if not raw.tenant_id:
        raise MalformedNotice("tenant_id: is required")
    if not is_tenant_id(raw.tenant_id):
        raise MalformedNotice("tenant_id: is not a valid tenant id")
    if raw.sequence is not None and not 1 <= raw.sequence <= MAX_SEQUENCE:
        raise MalformedNotice(f"sequence: must be from 1 to {MAX_SEQUENCE}")
    _check_text("agent_id", raw.agent_id, MAX_AGENT_ID_CHARS)
    _check_data(raw.event, raw.data)
    usage = raw.usage
    for name, count in (
        ("prompt_tokens", usage.prompt_tokens),
        ("completion_tokens", usage.completion_tokens),
        ("total_tokens", usage.total_tokens),
    ):
        if not 0 <= count <= MAX_TOKENS:
            raise MalformedNotice(f"usage.{name}: must be from 0 to {MAX_TOKENS}")
    return Notice(
        event=raw.event,
        service=raw.service,
        job_id=raw.job_id,
        tenant_id=raw.tenant_id,
        sequence=raw.sequence or 0,
        agent_id=raw.agent_id,
        data=raw.data,
        usage=usage,
    )


def _check_text(name: str, value: Any, limit: int) -> None:
    if not isinstance(value, str):
        raise MalformedNotice(f"{name}: must be text")
    if len(value) > limit:
        raise MalformedNotice(f"{name}: longer than {limit} characters")


def _check_data(event: NoticeEvent, data: Mapping[str, Any]) -> None:
    """The event's own fields (the shapes handlers.event_converters and handlers.ws_notices
    build)."""
    if event is NoticeEvent.PROGRESS:
        fraction = data.get("fraction", 0.0)
        if not isinstance(fraction, int | float) or not 0.0 <= fraction <= 1.0:
            raise MalformedNotice("progress: must be between 0 and 1")
        _check_text("status_message", data.get("message", ""), MAX_STATUS_MESSAGE_CHARS)
    elif event is NoticeEvent.DELTA:
        _check_text("delta", data.get("text", ""), MAX_DELTA_CHARS)
    elif event is NoticeEvent.FAILED:
        error = data.get("error")
        if not isinstance(error, Mapping):
            raise MalformedNotice("error: must be an object")
        _check_text("error.code", error.get("code", ""), MAX_ERROR_CODE_CHARS)
        _check_text("error.message", error.get("message", ""), MAX_ERROR_MESSAGE_CHARS)
    elif event is NoticeEvent.COMPLETED:
        _check_result(data.get("result", {}))
    elif event is NoticeEvent.TOOL_CALL:
        _check_tool_call(data)
    elif event is NoticeEvent.STEP:
        _check_step(data)


def _check_required(name: str, value: Any, limit: int) -> None:
    _check_text(name, value, limit)
    if not value:
        raise MalformedNotice(f"{name}: is required")


def _check_phase(prefix: str, data: Mapping[str, Any]) -> None:
    phase = data.get("phase")
    if phase not in StepPhase.__members__.values():
        raise MalformedNotice(f"{prefix}.phase: must be one of {_PHASES}")
    error = data.get("error")
    if error is None:
        if phase == StepPhase.FAILED:
            raise MalformedNotice(f"{prefix}.error: is required when the phase is failed")
        return
    if not isinstance(error, Mapping):
        raise MalformedNotice(f"{prefix}.error: must be an object")
    _check_text(f"{prefix}.error.code", error.get("code", ""), MAX_ERROR_CODE_CHARS)
    _check_text(f"{prefix}.error.message", error.get("message", ""), MAX_ERROR_MESSAGE_CHARS)
    if not isinstance(error.get("retryable", False), bool):
        raise MalformedNotice(f"{prefix}.error.retryable: must be true or false")


def _check_tool_call(data: Mapping[str, Any]) -> None:
    if not data:
        raise MalformedNotice("tool_call: is required")
    _check_required("tool_call.call_id", data.get("call_id", ""), MAX_CALL_ID_CHARS)
    _check_required("tool_call.name", data.get("name", ""), MAX_TOOL_NAME_CHARS)
    _check_phase("tool_call", data)
    arguments = data.get("arguments", "")
    _check_text("tool_call.arguments", arguments, MAX_ARGUMENTS_CHARS)
    if arguments:
        try:
            parsed = json.loads(arguments)
        except ValueError:
            raise MalformedNotice("tool_call.arguments: must be JSON text") from None
        check_json_tree("tool_call.arguments", parsed, MAX_RESULT_DEPTH, MalformedNotice)
    _check_text("tool_call.result_summary", data.get("result_summary", ""), MAX_SUMMARY_CHARS)


def _check_step(data: Mapping[str, Any]) -> None:
    if not data:
        raise MalformedNotice("step: is required")
    _check_required("step.step_id", data.get("step_id", ""), MAX_STEP_ID_CHARS)
    _check_required("step.name", data.get("name", ""), MAX_STEP_NAME_CHARS)
    index = data.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= MAX_STEP_INDEX:
        raise MalformedNotice(f"step.index: must be a whole number from 0 to {MAX_STEP_INDEX}")
    _check_phase("step", data)
    _check_text("step.summary", data.get("summary", ""), MAX_SUMMARY_CHARS)


@dataclass(frozen=True, slots=True)
class AgentChange:
    """Agent Management reports that agent ``agent_id`` of ``tenant_id`` changed (a validated
    agent_changed notice): cached copies of its configuration must go."""

    tenant_id: str
    agent_id: str


def validate_agent_change(raw: NoticeInput) -> AgentChange:
    """An agent_changed notice: only from Agent Management, about no job, naming a tenant and
    an agent."""
    if raw.problem:
        raise MalformedNotice(raw.problem)
    if raw.service is not Service.AGENT_MANAGEMENT:
        raise MalformedNotice("service: agent_changed comes from agent_management only")
    if raw.job_id:
        raise MalformedNotice("job_id: must be empty for agent_changed (it is about no job)")
    if not raw.tenant_id:
        raise MalformedNotice("tenant_id: is required")
    if not is_tenant_id(raw.tenant_id):
        raise MalformedNotice("tenant_id: is not a valid tenant id")
    _check_required("agent_id", raw.agent_id, MAX_AGENT_ID_CHARS)
    return AgentChange(raw.tenant_id, raw.agent_id)


# What the process does when an agent changed (drop the cached configuration): given the
# tenant and agent ids.
AgentChangedHook = Callable[[str, str], Awaitable[None]]


def _check_result(result: Any) -> None:
    if not isinstance(result, Mapping):
        raise MalformedNotice("result: must be an object")
    _check_text("result.model", result.get("model", ""), MAX_MODEL_CHARS)
    embeddings = result.get("embeddings", [])
    if not isinstance(embeddings, list) or not all(
        isinstance(vector, list) and all(_is_finite_number(x) for x in vector)
        for vector in embeddings
    ):
        raise MalformedNotice("result.embeddings: must be lists of finite numbers")
    check_json_tree("result", result, MAX_RESULT_DEPTH, MalformedNotice)
    size = len(json.dumps(result, ensure_ascii=False, separators=(",", ":")).encode())
    if size > MAX_RESULT_BYTES:
        raise MalformedNotice(f"result: larger than {MAX_RESULT_BYTES} bytes as JSON")


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) <= MAX_SEQUENCE
    return isinstance(value, float) and math.isfinite(value)


def check_json_tree(
    name: str, value: Any, max_depth: int, error: Callable[[str], Exception]
) -> None:
    """Raise ``error`` naming ``name`` unless ``value`` is plain JSON data (objects with text
    keys, arrays, text, booleans, null, finite numbers, integers within +-(2**53 - 1)) nested at
    most ``max_depth`` levels (``value`` itself being level 1). Iterative, so any depth is
    safe to check."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, Mapping):
            if not all(isinstance(key, str) for key in item):
                raise error(f"{name}: object keys must be text")
            children = item.values()
        elif isinstance(item, list | tuple):
            children = item
        elif item is None or isinstance(item, str | bool) or _is_finite_number(item):
            continue
        else:
            raise error(f"{name}: holds a value that is not finite JSON data")
        if depth > max_depth:
            raise error(f"{name}: nested deeper than {max_depth} levels")
        stack.extend((child, depth + 1) for child in children)


@dataclass(frozen=True, slots=True)
class Rejection:
    index: int
    job_id: str
    verdict: Verdict
    detail: str


@dataclass(slots=True)
class VerdictTally:
    """Counts of every verdict of one stream, and the first rejected notices."""

    received: int = 0
    counts: dict[Verdict, int] = field(default_factory=lambda: dict.fromkeys(Verdict, 0))
    rejected: list[Rejection] = field(default_factory=list)
    rejected_truncated: bool = False

    def add(self, job_id: str, outcome: NoticeOutcome) -> None:
        index = self.received
        self.received += 1
        self.counts[outcome.verdict] += 1
        if outcome.verdict in (Verdict.ACCEPTED, Verdict.DUPLICATE):
            return
        if len(self.rejected) < MAX_LISTED_REJECTIONS:
            self.rejected.append(Rejection(index, job_id, outcome.verdict, outcome.detail))
        else:
            self.rejected_truncated = True


class NoticeMetrics(Protocol):
    """Where verdicts and tokens are counted (the server passes the server.metrics module)."""

    def record_notice(self, verdict: str) -> None: ...

    def record_tokens(self, tenant: str, n: int) -> None: ...


class NoticeProcessor:
    """Validates and applies notices, counts every verdict and the tokens of completed jobs
    (server.metrics), and fills the embedding cache from completed embedding jobs. An
    agent_changed notice goes to ``on_agent_changed`` (without one it is accepted and changes
    nothing)."""

    def __init__(
        self,
        jobs: JobStore,
        limits: JobLimits,
        *,
        embedding_cache: EmbeddingResultCache | None = None,
        metrics: NoticeMetrics | None = None,
        on_agent_changed: AgentChangedHook | None = None,
        on_finishing: Callable[[HandoffClaim], None] | None = None,
        on_handed_over: Callable[[str], None] | None = None,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        """``on_finishing`` starts the finalize of a job a completed notice made FINISHING
        (domain.chat.ChatOrchestrator.finalize_soon): this process holds its lease.
        ``on_handed_over`` hears the id of every job a notice was applied to (accepted, or the
        job found finished: either way its hand-off record is gone), so that a hand-off of it
        in this process skips its own confirmation (ChatOrchestrator.notice_applied).
        ``tracing``: each accepted notice is a span in its job's trace (the store answers
        with the job's trace context), and what it starts (the finalize) runs under it."""
        self._tracing = tracing
        self._traced = tracing.enabled  # read once: tracing off costs one check per notice
        self._jobs = jobs
        self._on_finishing = on_finishing
        self._on_handed_over = on_handed_over
        self._limits = limits
        self._cache = embedding_cache
        self._metrics = metrics
        self.on_agent_changed = on_agent_changed

    async def process_many(
        self, raws: list[NoticeInput], caller: Caller | None
    ) -> list[NoticeOutcome]:
        """Apply notices that arrived together (``process_each``); the first error applying
        one is raised."""
        outcomes = await self.process_each(raws, caller)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
        return cast(list[NoticeOutcome], outcomes)

    async def process(self, raw: NoticeInput, caller: Caller | None) -> NoticeOutcome:
        """Judge and apply one notice sent by ``caller`` (``process_each``)."""
        return (await self.process_many([raw], caller))[0]

    async def process_each(
        self, raws: Sequence[NoticeInput], caller: Caller | None
    ) -> list[NoticeOutcome | Exception]:
        """Judge and apply notices that arrived together, each on its own: a notice for a
        service the caller's key does not speak for (Caller.speaks_for) is WRONG_SERVICE,
        decided before the store is read, so it never reveals whether the job exists
        (``caller`` None skips that check: callers inside the process, tests). The valid ones
        go to the store together (JobStore.apply_notices: one round trip, those of one job in
        their order). Each notice gets its own outcome, in the order of ``raws``, or the error
        applying it; raises only when the store could apply none (unreachable)."""
        outcomes: list[NoticeOutcome | Exception | None] = [None] * len(raws)
        valid: list[tuple[int, Notice]] = []
        for index, raw in enumerate(raws):
            if raw.event is NoticeEvent.AGENT_CHANGED:
                try:
                    outcomes[index] = await self._agent_changed(raw, caller)
                except Exception as exc:  # the hook failed: that notice alone
                    outcomes[index] = exc
                continue
            judged = self._judge(raw, caller)
            if isinstance(judged, NoticeOutcome):
                outcomes[index] = judged
            else:
                valid.append((index, judged))
        if valid:
            start_ns = time.time_ns() if self._traced else 0
            applied = await self._jobs.apply_notices([n for _, n in valid], self._limits)
            handed_over = self._on_handed_over
            for (index, notice), outcome in zip(valid, applied, strict=True):
                if not isinstance(outcome, Exception):
                    if handed_over is not None and outcome.verdict in _HANDED_OVER:
                        handed_over(notice.job_id)
                    try:
                        await self._followed(notice, outcome, start_ns)
                    except Exception as exc:  # e.g. the embedding cache's read failed
                        outcome = exc
                outcomes[index] = outcome
        done = [outcome for outcome in outcomes if outcome is not None]
        if self._metrics is not None:
            for outcome in done:
                if isinstance(outcome, NoticeOutcome):
                    self._metrics.record_notice(outcome.verdict.value)
        return done

    def _judge(self, raw: NoticeInput, caller: Caller | None) -> Notice | NoticeOutcome:
        """The valid notice, or the verdict that rejects it before the store is asked."""
        try:
            notice = validate_notice(raw)
        except MalformedNotice as exc:
            return NoticeOutcome(Verdict.MALFORMED, detail=str(exc))
        refusal = _refused_unless_spoken_for(
            caller, notice.service, f"notice of job {notice.job_id}"
        )
        return notice if refusal is None else refusal

    async def _followed(self, notice: Notice, outcome: NoticeOutcome, start_ns: int) -> None:
        """What follows a notice the store applied (``_applied``), in the span of the notice in
        its job's trace when tracing is on and the job has a trace."""
        if not self._traced or not outcome.traceparent:
            await self._applied(notice, outcome)
            return
        attributes = {
            "orchestrator.job_id": notice.job_id,
            "orchestrator.service": notice.service.value,
            "orchestrator.notice_sequence": notice.sequence,
        }
        with self._tracing.record_span(
            f"notice {notice.event.value}", outcome.traceparent, start_ns, attributes=attributes
        ):
            await self._applied(notice, outcome)

    async def _applied(self, notice: Notice, outcome: NoticeOutcome) -> None:
        """What follows a notice the store applied: the finalize it starts, the tokens counted,
        the embedding cache filled; a rejection logged."""
        if outcome.finishing is not None and self._on_finishing is not None:
            self._on_finishing(outcome.finishing)
        if outcome.verdict is Verdict.ACCEPTED and notice.event is NoticeEvent.COMPLETED:
            if self._metrics is not None:
                self._metrics.record_tokens(notice.tenant_id, notice.usage.total_tokens)
            if notice.service is Service.EMBEDDING:
                await self._fill_cache(notice)
        if outcome.verdict is not Verdict.ACCEPTED:
            log.info(
                "notice rejected: %s (job %s, tenant %s, service %s)",
                outcome.verdict.value,
                notice.job_id,
                notice.tenant_id,
                notice.service.value,
            )

    async def _agent_changed(self, raw: NoticeInput, caller: Caller | None) -> NoticeOutcome:
        try:
            change = validate_agent_change(raw)
        except MalformedNotice as exc:
            return NoticeOutcome(Verdict.MALFORMED, detail=str(exc))
        refusal = _refused_unless_spoken_for(caller, Service.AGENT_MANAGEMENT, "agent_changed")
        if refusal is not None:
            return refusal
        log.info("agent %s of tenant %s changed", change.agent_id, change.tenant_id)
        if self.on_agent_changed is not None:
            await self.on_agent_changed(change.tenant_id, change.agent_id)
        return NoticeOutcome(Verdict.ACCEPTED)

    async def _fill_cache(self, notice: Notice) -> None:
        cache = self._cache
        result = notice.data.get("result")
        if cache is None or not cache.enabled or not isinstance(result, Mapping):
            return
        try:
            job = await self._jobs.get_job(notice.tenant_id, notice.job_id)
        except DataLoss:  # logged by the store; the notice is applied, only the cache misses
            return
        if job is not None and job.cache_key:
            await cache.fill(notice.tenant_id, job.cache_key, result)


# The verdicts of notices that ran on their job (which dropped its hand-off record, if any).
_HANDED_OVER = frozenset((Verdict.ACCEPTED, Verdict.JOB_FINISHED))


def _refused_unless_spoken_for(
    caller: Caller | None, service: Service, what: str
) -> NoticeOutcome | None:
    """WRONG_SERVICE, logged, when the caller's key does not speak for ``service`` (``what``
    names the notice in the log); None when it does or no caller is given."""
    if caller is None or caller.speaks_for(service):
        return None
    refused = caller.key_id or "of this caller"  # a test caller may have no key id
    log.info(
        "%s rejected: wrong_service (key %s does not speak for %s)", what, refused, service.value
    )
    return NoticeOutcome(
        Verdict.WRONG_SERVICE,
        detail=f"service: the API key {refused} does not speak for {service.value}",
    )

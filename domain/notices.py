"""Notices from the platform's services: validation, application, and the verdict tally a
PublishUpdates stream (or a WebSocket) answers with.

A notice is judged on its own: a malformed one or one about another tenant's job is rejected
and counted, and the stream goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from domain.embedding_cache import EmbeddingResultCache
from domain.ids import is_resource_id, is_tenant_id
from domain.jobs import JobLimits, Notice, NoticeEvent, NoticeOutcome, Verdict
from domain.models import Service, TokenUsage
from registry.base import JobStore

log = logging.getLogger(__name__)

MAX_LISTED_REJECTIONS = 1000


@dataclass(frozen=True, slots=True)
class NoticeInput:
    """A notice as received, before validation. ``sequence`` None means the sender does not
    number its notices (the seed's JSON form): each one is then applied in arrival order."""

    event: NoticeEvent | None
    service: Service | None
    job_id: str
    tenant_id: str
    sequence: int | None
    agent_id: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)
    usage: TokenUsage = field(default_factory=TokenUsage)


class MalformedNotice(ValueError):
    """A notice field is missing or out of range; the message names the field."""


def validate_notice(raw: NoticeInput) -> Notice:
    if raw.event is None:
        raise MalformedNotice("event: is required")
    if raw.service is None:
        raise MalformedNotice("service: is required")
    if not raw.job_id:
        raise MalformedNotice("job_id: is required")
    if not is_resource_id(raw.job_id):
        raise MalformedNotice("job_id: is not a job id issued by the orchestrator")
    if not raw.tenant_id:
        raise MalformedNotice("tenant_id: is required")
    if not is_tenant_id(raw.tenant_id):
        raise MalformedNotice("tenant_id: is not a valid tenant id")
    if raw.sequence is not None and raw.sequence < 1:
        raise MalformedNotice("sequence: must be 1 or more")
    if raw.event is NoticeEvent.PROGRESS:
        fraction = raw.data.get("fraction", 0.0)
        if not 0.0 <= fraction <= 1.0:
            raise MalformedNotice("progress: must be between 0 and 1")
    usage = raw.usage
    if min(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) < 0:
        raise MalformedNotice("usage: token counts must not be negative")
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
    (server.metrics), and fills the embedding cache from completed embedding jobs."""

    def __init__(
        self,
        jobs: JobStore,
        limits: JobLimits,
        *,
        embedding_cache: EmbeddingResultCache | None = None,
        metrics: NoticeMetrics | None = None,
    ) -> None:
        self._jobs = jobs
        self._limits = limits
        self._cache = embedding_cache
        self._metrics = metrics

    async def process_many(self, raws: list[NoticeInput]) -> list[NoticeOutcome]:
        """Apply notices that arrived together: those about one job in order, different jobs
        concurrently. Outcomes come back in the order of ``raws``."""
        if len(raws) == 1:
            return [await self.process(raws[0])]
        by_job: dict[str, list[int]] = {}
        for index, raw in enumerate(raws):
            by_job.setdefault(raw.job_id, []).append(index)
        outcomes: list[NoticeOutcome | None] = [None] * len(raws)

        async def run(indexes: list[int]) -> None:
            for index in indexes:
                outcomes[index] = await self.process(raws[index])

        try:
            async with asyncio.TaskGroup() as group:
                for indexes in by_job.values():
                    group.create_task(run(indexes))
        except ExceptionGroup as failed:  # e.g. Redis went away: report it as itself
            raise failed.exceptions[0] from None
        return [outcome for outcome in outcomes if outcome is not None]

    async def process(self, raw: NoticeInput) -> NoticeOutcome:
        outcome = await self._process(raw)
        if self._metrics is not None:
            self._metrics.record_notice(outcome.verdict.value)
        return outcome

    async def _process(self, raw: NoticeInput) -> NoticeOutcome:
        try:
            notice = validate_notice(raw)
        except MalformedNotice as exc:
            return NoticeOutcome(Verdict.MALFORMED, detail=str(exc))
        outcome = await self._jobs.apply_notice(notice, self._limits)
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
        return outcome

    async def _fill_cache(self, notice: Notice) -> None:
        cache = self._cache
        result = notice.data.get("result")
        if cache is None or not cache.enabled or not isinstance(result, Mapping):
            return
        job = await self._jobs.get_job(notice.tenant_id, notice.job_id)
        if job is not None and job.cache_key:
            await cache.fill(notice.tenant_id, job.cache_key, result)

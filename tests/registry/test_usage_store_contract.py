"""The UsageStore and EmbeddingCache contracts on both backends: usage is added by the job
store exactly once per completed notice, per tenant, UTC day and agent; cache entries are per
tenant. Plus memory-only expiry with a fake clock."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from domain.ids import new_id
from domain.jobs import IfBusy, JobLimits, NewJob, Notice, NoticeEvent, Verdict
from domain.models import NewSession, Service, TokenUsage, WorkKind
from domain.ports.usage import day_number
from domain.usage import USAGE_RETENTION_MS
from registry.backend import Backend, BackendConfig, open_backend
from registry.memory_usage import MemoryEmbeddingCache, MemoryUsageStore

LIMITS = JobLimits(deadline_ms=60_000, heartbeat_ms=60_000, retention_ms=60_000)


@pytest.fixture
async def registry(backend_url: str | None) -> AsyncIterator[Backend]:
    opened = open_backend(
        BackendConfig(redis_url=backend_url, key_prefix="test", session_retention_ms=60_000)
    )
    yield opened
    await opened.aclose()


async def run_job(
    registry: Backend, tenant: str, agent: str, event: NoticeEvent, usage: TokenUsage
) -> str:
    session_id = new_id()
    await registry.sessions.create_session(tenant, session_id, NewSession(agent, "", {}, 60_000))
    job_id = new_id()
    new = NewJob(job_id, session_id, agent, Service.QUERY, WorkKind.LLM_QUERY, "hi", "r1")
    await registry.jobs.start_job(tenant, new, LIMITS, if_busy=IfBusy.RUN)
    notice = Notice(event, Service.QUERY, job_id, tenant, 1, data={}, usage=usage)
    outcome = await registry.jobs.apply_notice(notice, LIMITS)
    assert outcome.verdict is Verdict.ACCEPTED
    # The same notice again is a duplicate and adds nothing.
    assert (await registry.jobs.apply_notice(notice, LIMITS)).verdict is Verdict.DUPLICATE
    return job_id


def today() -> int:
    return day_number(time.time_ns() // 1_000_000)


async def test_completed_jobs_add_usage_per_tenant_day_and_agent(registry: Backend) -> None:
    await run_job(registry, "acme", "a1", NoticeEvent.COMPLETED, TokenUsage(1, 2, 3))
    await run_job(registry, "acme", "a1", NoticeEvent.COMPLETED, TokenUsage(10, 20, 30))
    await run_job(registry, "acme", "a2", NoticeEvent.COMPLETED, TokenUsage(0, 5, 5))
    await run_job(registry, "acme", "a2", NoticeEvent.FAILED, TokenUsage(7, 7, 14))
    await run_job(registry, "globex", "a1", NoticeEvent.COMPLETED, TokenUsage(1, 1, 2))
    day = today()
    (usage,) = await registry.usage.usage_days("acme", day - 3, day + 3)
    assert usage.day == day
    assert usage.usage == TokenUsage(11, 27, 38)
    assert dict(usage.agents) == {"a1": 33, "a2": 5}
    assert usage.jobs == 3
    assert await registry.usage.tokens_today("acme") == 38
    assert await registry.usage.tokens_today("globex") == 2
    assert await registry.usage.tokens_today("initech") == 0
    assert await registry.usage.usage_days("acme", day - 10, day - 1) == []


async def test_jobs_record_their_agent_and_usage(registry: Backend) -> None:
    job_id = await run_job(registry, "acme", "a1", NoticeEvent.COMPLETED, TokenUsage(1, 2, 3))
    job = await registry.jobs.get_job("acme", job_id)
    assert job is not None
    assert (job.agent_id, job.usage) == ("a1", TokenUsage(1, 2, 3))


async def test_embedding_cache_entries_are_per_tenant(registry: Backend) -> None:
    cache = registry.embedding_cache
    assert await cache.get_result("acme", "k1") is None
    await cache.put_result("acme", "k1", '{"model":"m"}', 60_000)
    assert await cache.get_result("acme", "k1") == '{"model":"m"}'
    assert await cache.get_result("globex", "k1") is None
    await cache.put_result("acme", "k1", '{"model":"m2"}', 60_000)
    assert await cache.get_result("acme", "k1") == '{"model":"m2"}'


async def test_memory_cache_and_usage_expire_by_their_clock() -> None:
    now = [1_000_000]
    cache = MemoryEmbeddingCache(clock=lambda: now[0], max_entries=2)
    await cache.put_result("acme", "k1", "v1", 100)
    now[0] += 100
    assert await cache.get_result("acme", "k1") is None
    for key in ("a", "b", "c"):  # over the bound: the oldest goes
        await cache.put_result("acme", key, key, 1_000)
    assert await cache.get_result("acme", "a") is None
    assert await cache.get_result("acme", "c") == "c"

    usage = MemoryUsageStore(clock=lambda: now[0])
    usage.add("acme", "a1", TokenUsage(1, 1, 2))
    day = day_number(now[0])
    assert [d.day for d in await usage.usage_days("acme", day, day)] == [day]
    now[0] += USAGE_RETENTION_MS
    assert await usage.usage_days("acme", day, day) == []

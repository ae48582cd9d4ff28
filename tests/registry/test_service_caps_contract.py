"""The limits toward the services in the JobStore's start path, on both backends: a per-tenant
cap on jobs in flight per service and a per-tenant tokens-per-minute limit, checked and counted
in the same atomic step as the start (domain.service_caps)."""

from __future__ import annotations

from dataclasses import replace

from domain.agents import AgentConfig, AgentKind
from domain.ids import new_id
from domain.jobs import (
    ActivateOutcome,
    EventDraft,
    EventKind,
    IfBusy,
    JobLimits,
    JobState,
    NewJob,
    Notice,
    NoticeEvent,
    StartedJob,
    Verdict,
)
from domain.models import Service, TokenUsage, WorkKind
from domain.plans import plan_for
from domain.service_caps import MINUTE_MS, LimitKind, LimitReached, ServiceCaps
from registry.backend import Backend
from tests.support.registries import new_session

TENANT = "acme"
OTHER = "globex"
BASE = JobLimits(
    deadline_ms=60_000, heartbeat_ms=30_000, retention_ms=60_000, queue_timeout_ms=600_000
)
CAPPED = replace(BASE, caps=ServiceCaps(in_flight=2, retry_after_ms=750))


def new_job(session_id: str, service: Service = Service.QUERY) -> NewJob:
    kind = WorkKind.EMBEDDING if service is Service.EMBEDDING else WorkKind.LLM_QUERY
    return NewJob(new_id(), session_id, "agent-1", service, kind, "hi", "r")


async def start(
    registry: Backend,
    limits: JobLimits,
    *,
    tenant_id: str = TENANT,
    service: Service = Service.QUERY,
    hold: bool = False,
) -> StartedJob | LimitReached:
    session_id = await new_session(registry, tenant_id)
    started = await registry.jobs.start_job(
        tenant_id, new_job(session_id, service), limits, if_busy=IfBusy.RUN, hold=hold
    )
    assert not isinstance(started, str), started  # never a StartRefused here
    return started


async def started(registry: Backend, limits: JobLimits, **kwargs: object) -> StartedJob:
    outcome = await start(registry, limits, **kwargs)  # type: ignore[arg-type]
    assert isinstance(outcome, StartedJob), outcome
    return outcome


async def complete(registry: Backend, job: StartedJob, tokens: int = 0) -> None:
    notice = Notice(
        NoticeEvent.COMPLETED,
        job.job.service,
        job.job.job_id,
        job.job.tenant_id,
        0,  # unnumbered: after any notice before it
        data={},
        usage=TokenUsage(0, tokens, tokens),
    )
    assert (await registry.jobs.apply_notice(notice, BASE)).verdict is Verdict.ACCEPTED


async def test_a_start_beyond_the_in_flight_cap_is_refused_and_records_nothing(
    registry: Backend,
) -> None:
    await started(registry, CAPPED)
    await started(registry, CAPPED)
    session_id = await new_session(registry, TENANT)
    new = new_job(session_id)

    refused = await registry.jobs.start_job(TENANT, new, CAPPED, if_busy=IfBusy.RUN)

    assert refused == LimitReached(LimitKind.IN_FLIGHT, Service.QUERY, 2, 750)
    assert await registry.jobs.get_job(TENANT, new.job_id) is None
    page = await registry.events.read_after(TENANT, session_id, 0, limit=10)
    assert page.events == []
    session = await registry.sessions.get_session(TENANT, session_id, touch=False)
    assert session is not None and not session.pending_job_ids


async def test_the_in_flight_cap_counts_each_service_on_its_own(registry: Backend) -> None:
    await started(registry, CAPPED, service=Service.QUERY)
    await started(registry, CAPPED, service=Service.QUERY)

    assert isinstance(await start(registry, CAPPED, service=Service.EMBEDDING), StartedJob)
    assert isinstance(await start(registry, CAPPED, service=Service.QUERY), LimitReached)


async def test_the_in_flight_cap_counts_each_tenant_on_its_own(registry: Backend) -> None:
    await started(registry, CAPPED)
    await started(registry, CAPPED)

    assert isinstance(await start(registry, CAPPED, tenant_id=OTHER), StartedJob)


async def test_a_running_job_stays_counted_and_an_ended_one_frees_its_place(
    registry: Backend,
) -> None:
    first = await started(registry, CAPPED)
    second = await started(registry, CAPPED)
    progress = Notice(NoticeEvent.PROGRESS, Service.QUERY, first.job.job_id, TENANT, 1, data={})
    assert (await registry.jobs.apply_notice(progress, BASE)).verdict is Verdict.ACCEPTED
    assert isinstance(await start(registry, CAPPED), LimitReached)

    await complete(registry, first)
    assert isinstance(await start(registry, CAPPED), StartedJob)
    assert isinstance(await start(registry, CAPPED), LimitReached)

    cancel = EventDraft(second.job.job_id, EventKind.CANCELLED, "r", {"reason": "asked"})
    await registry.jobs.finish_job(TENANT, second.job.job_id, cancel, BASE)
    assert isinstance(await start(registry, CAPPED), StartedJob)


async def test_a_tenant_override_replaces_the_default_cap(registry: Backend) -> None:
    caps = ServiceCaps(in_flight=5, in_flight_overrides={TENANT: 1, OTHER: 0})
    limits = replace(BASE, caps=caps)
    await started(registry, limits)
    assert isinstance(await start(registry, limits), LimitReached)
    for _ in range(7):  # 0: unlimited for that tenant, above the default
        await started(registry, limits, tenant_id=OTHER)


async def test_a_queued_job_is_not_counted_until_it_is_activated(registry: Backend) -> None:
    queued = await started(registry, CAPPED, hold=True)
    assert queued.queued
    await started(registry, CAPPED)
    await started(registry, CAPPED)

    outcome = await registry.jobs.activate_job(TENANT, queued.job.job_id, CAPPED)

    assert outcome == LimitReached(LimitKind.IN_FLIGHT, Service.QUERY, 2, 750)
    job = await registry.jobs.get_job(TENANT, queued.job.job_id)
    assert job is not None and job.state is JobState.QUEUED


async def test_a_queued_job_over_the_cap_starts_once_a_place_is_free(registry: Backend) -> None:
    queued = await started(registry, CAPPED, hold=True)
    first = await started(registry, CAPPED)
    await started(registry, CAPPED)
    assert isinstance(
        await registry.jobs.activate_job(TENANT, queued.job.job_id, CAPPED), LimitReached
    )

    await complete(registry, first)
    outcome = await registry.jobs.activate_job(TENANT, queued.job.job_id, CAPPED)

    assert outcome is ActivateOutcome.STARTED
    assert isinstance(await start(registry, CAPPED), LimitReached)  # it counts now


async def test_tokens_charged_this_minute_at_the_limit_hold_back_new_starts(
    registry: Backend,
) -> None:
    limits = replace(BASE, caps=ServiceCaps(tokens_per_minute=100))
    job = await started(registry, limits)
    await complete(registry, job, tokens=99)
    assert isinstance(await start(registry, limits), StartedJob)
    await complete(registry, await started(registry, limits), tokens=1)

    refused = await start(registry, limits, service=Service.EMBEDDING)

    assert isinstance(refused, LimitReached)
    assert (refused.limit, refused.service, refused.cap) == (
        LimitKind.TOKENS_PER_MINUTE,
        Service.EMBEDDING,
        100,
    )
    assert 0 < refused.retry_after_ms <= MINUTE_MS
    assert isinstance(await start(registry, limits, tenant_id=OTHER), StartedJob)


async def test_jobs_count_in_flight_while_no_limit_is_set(registry: Backend) -> None:
    """A limit switched on later (or set on another replica) sees the jobs already running."""
    await started(registry, BASE)
    await started(registry, BASE)

    assert isinstance(await start(registry, CAPPED), LimitReached)


async def test_a_job_its_service_completed_frees_its_place_while_history_is_appended(
    registry: Backend,
) -> None:
    agent = AgentConfig(TENANT, "agent-1", AgentKind.LLM, 1, model="m1")
    session_id = await new_session(registry, TENANT)
    new = replace(
        new_job(session_id), plan=plan_for(WorkKind.LLM_QUERY, agent, now_ms=1_000), agent=agent
    )
    first = await registry.jobs.start_job(TENANT, new, CAPPED, if_busy=IfBusy.RUN)
    assert isinstance(first, StartedJob) and first.job.plan is not None
    assert first.job.plan.appends_history
    await started(registry, CAPPED)
    assert isinstance(await start(registry, CAPPED), LimitReached)

    await complete(registry, first)

    job = await registry.jobs.get_job(TENANT, new.job_id)
    assert job is not None and job.state is JobState.FINISHING
    assert isinstance(await start(registry, CAPPED), StartedJob)

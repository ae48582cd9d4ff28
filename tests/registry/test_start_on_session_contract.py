"""JobStore.start_on_session on every backend: a message's session read (as
SessionStore.get_session(touch=True) reads it) and its job's start in one step. The job runs on
the session's agent; a missing session, another tenant's, a closed one and an expired one are
refused as the session read refused them before (SendMessage's NOT_FOUND and
FAILED_PRECONDITION naming the state), and nothing is recorded."""

from __future__ import annotations

import asyncio

from domain.ids import new_id
from domain.jobs import (
    IfBusy,
    JobLimits,
    JobState,
    NewJob,
    SessionNotOpen,
    StartedJob,
    StartRefused,
)
from domain.models import NewSession, Service, SessionState, WorkKind
from domain.service_caps import LimitReached
from registry.backend import Backend
from tests.support.registries import new_session

LIMITS = JobLimits(
    deadline_ms=60_000, heartbeat_ms=30_000, retention_ms=60_000, queue_timeout_ms=600_000
)
TENANT = "acme"


def message_job(session_id: str, job_id: str | None = None) -> NewJob:
    """A message's job, its agent left to the session."""
    return NewJob(job_id or new_id(), session_id, "", Service.QUERY, WorkKind.LLM_QUERY, "hi", "r")


async def start_on(
    registry: Backend, session_id: str, tenant_id: str = TENANT, job_id: str | None = None
) -> StartedJob | SessionNotOpen | StartRefused | LimitReached:
    return await registry.jobs.start_on_session(
        tenant_id, message_job(session_id, job_id), LIMITS, if_busy=IfBusy.RUN
    )


async def test_the_job_runs_on_the_sessions_agent(registry: Backend) -> None:
    session_id = await new_session(registry)
    started = await start_on(registry, session_id)
    assert isinstance(started, StartedJob)
    assert started.job.agent_id == "agent-1"
    assert started.job.state is JobState.PENDING
    job = await registry.jobs.get_job(TENANT, started.job.job_id)
    assert job is not None and job.agent_id == "agent-1"


async def test_the_start_slides_the_sessions_expiry_as_its_read_did(registry: Backend) -> None:
    session_id = await new_session(registry)
    before = await registry.sessions.get_session(TENANT, session_id, touch=False)
    assert before is not None
    await asyncio.sleep(0.02)
    assert isinstance(await start_on(registry, session_id), StartedJob)
    after = await registry.sessions.get_session(TENANT, session_id, touch=False)
    assert after is not None and after.expires_at_ms > before.expires_at_ms
    assert after.state is SessionState.BUSY and after.message_count == 1


async def test_a_missing_session_is_refused_and_nothing_is_recorded(registry: Backend) -> None:
    job_id = new_id()
    assert await start_on(registry, new_id(), job_id=job_id) is StartRefused.SESSION_MISSING
    assert await registry.jobs.get_job(TENANT, job_id) is None


async def test_another_tenants_session_is_missing_for_this_tenant(registry: Backend) -> None:
    session_id = await new_session(registry, tenant="other")
    assert await start_on(registry, session_id) is StartRefused.SESSION_MISSING
    session = await registry.sessions.get_session("other", session_id, touch=False)
    assert session is not None and session.message_count == 0


async def test_a_closed_session_is_refused_with_its_state(registry: Backend) -> None:
    session_id = await new_session(registry)
    await registry.sessions.close_session(TENANT, session_id)
    job_id = new_id()
    assert await start_on(registry, session_id, job_id=job_id) == SessionNotOpen(
        SessionState.CLOSED
    )
    assert await registry.jobs.get_job(TENANT, job_id) is None


async def test_a_session_past_its_expiry_is_refused_and_reads_expired(registry: Backend) -> None:
    session_id = new_id()
    await registry.sessions.create_session(TENANT, session_id, NewSession("agent-1", "", {}, 1))
    await asyncio.sleep(0.02)
    assert await start_on(registry, session_id) == SessionNotOpen(SessionState.EXPIRED)
    session = await registry.sessions.get_session(TENANT, session_id, touch=False)
    assert session is not None and session.state is SessionState.EXPIRED


async def test_a_job_id_already_recorded_is_refused_before_the_session_is_read(
    registry: Backend,
) -> None:
    session_id = await new_session(registry)
    first = await start_on(registry, session_id)
    assert isinstance(first, StartedJob)
    await registry.sessions.close_session(TENANT, session_id)
    again = await start_on(registry, session_id, job_id=first.job.job_id)
    assert again is StartRefused.JOB_EXISTS

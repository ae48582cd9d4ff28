"""The JobStore's child jobs (internal calls, docs/adr/0011) on both backends: a child starts
only while its parent is in flight and has calls left, the parent lists its children, and a
child's completion charges the tenant and rolls its tokens up into the parent job and the
parent's session in the same step (only while the parent is in flight); the parent's completed
event reports its own tokens plus its children's."""

from __future__ import annotations

from dataclasses import replace

from domain.ids import derived_id, new_id
from domain.jobs import (
    EventDraft,
    EventKind,
    IfBusy,
    JobLimits,
    JobState,
    NewJob,
    Notice,
    NoticeEvent,
    StartedJob,
    StartRefused,
    Verdict,
)
from domain.models import NewSession, Service, SessionFilter, TokenUsage, WorkKind
from registry.backend import Backend
from tests.support.registries import new_session

LIMITS = JobLimits(
    deadline_ms=60_000, heartbeat_ms=30_000, retention_ms=60_000, max_internal_calls=2
)
TENANT = "acme"


def job(session_id: str, *, parent: str = "", job_id: str = "") -> NewJob:
    return NewJob(
        job_id=job_id or new_id(),
        session_id=session_id,
        agent_id="agent-1",
        service=Service.QUERY,
        kind=WorkKind.LLM_QUERY,
        content="prompt",
        request_id="req-1",
        keep_final=bool(parent),
        parent_job_id=parent,
    )


async def started(registry: Backend, new: NewJob) -> StartedJob:
    outcome = await registry.jobs.start_job(TENANT, new, LIMITS, if_busy=IfBusy.RUN)
    assert isinstance(outcome, StartedJob), outcome
    return outcome


async def calls_session(registry: Backend, parent_id: str) -> str:
    session_id = derived_id(parent_id, "internal-calls")
    hidden = NewSession("agent-1", "", {}, 60_000, hidden=True)
    await registry.sessions.create_session(TENANT, session_id, hidden)
    return session_id


def completed(job_id: str, usage: TokenUsage, sequence: int = 1) -> Notice:
    data = {"result": {"text": "ok"}, "usage": {"total_tokens": -1}}  # the store writes usage
    return Notice(
        NoticeEvent.COMPLETED, Service.QUERY, job_id, TENANT, sequence, "agent-1", data, usage
    )


async def family(registry: Backend) -> tuple[str, str, str]:
    """A parent job (running) on a session, and its calls' hidden session."""
    session_id = await new_session(registry)
    parent = (await started(registry, job(session_id))).job.job_id
    progress = Notice(NoticeEvent.PROGRESS, Service.QUERY, parent, TENANT, 1, "agent-1", {})
    assert (await registry.jobs.apply_notice(progress, LIMITS)).verdict is Verdict.ACCEPTED
    return parent, session_id, await calls_session(registry, parent)


async def test_a_child_starts_only_for_a_parent_in_flight(registry: Backend) -> None:
    session_id = await new_session(registry)
    hidden = await calls_session(registry, "unknown")
    refused = await registry.jobs.start_job(
        TENANT, job(hidden, parent=new_id()), LIMITS, if_busy=IfBusy.RUN
    )
    assert refused is StartRefused.PARENT_NOT_IN_FLIGHT
    parent = (await started(registry, job(session_id))).job.job_id
    cancel = EventDraft(parent, EventKind.CANCELLED, "req-1", {"reason": "test"})
    await registry.jobs.finish_job(TENANT, parent, cancel, LIMITS)
    late = await registry.jobs.start_job(
        TENANT, job(hidden, parent=parent), LIMITS, if_busy=IfBusy.RUN
    )
    assert late is StartRefused.PARENT_NOT_IN_FLIGHT


async def test_a_parent_lists_its_children_up_to_the_limit(registry: Backend) -> None:
    parent, _, hidden = await family(registry)
    first = (await started(registry, job(hidden, parent=parent))).job.job_id
    second = (await started(registry, job(hidden, parent=parent))).job.job_id
    third = await registry.jobs.start_job(
        TENANT, job(hidden, parent=parent), LIMITS, if_busy=IfBusy.RUN
    )
    assert third is StartRefused.CALL_LIMIT
    recorded = await registry.jobs.get_job(TENANT, parent)
    assert recorded is not None and recorded.internal_call_ids == (first, second)
    child = await registry.jobs.get_job(TENANT, first)
    assert child is not None and child.parent_job_id == parent
    # The same child id again is the existing job, whatever the limit.
    again = await registry.jobs.start_job(
        TENANT, job(hidden, parent=parent, job_id=first), LIMITS, if_busy=IfBusy.RUN
    )
    assert again is StartRefused.JOB_EXISTS


async def test_a_childs_tokens_roll_up_into_its_parent_and_the_parents_session_once(
    registry: Backend,
) -> None:
    parent, session_id, hidden = await family(registry)
    child = (await started(registry, job(hidden, parent=parent))).job.job_id
    outcome = await registry.jobs.apply_notice(completed(child, TokenUsage(3, 5, 8)), LIMITS)
    assert outcome.verdict is Verdict.ACCEPTED and outcome.event is not None
    assert outcome.event.data["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 5,
        "total_tokens": 8,
    }
    again = await registry.jobs.apply_notice(completed(child, TokenUsage(3, 5, 8)), LIMITS)
    assert again.verdict is Verdict.DUPLICATE

    recorded = await registry.jobs.get_job(TENANT, parent)
    assert recorded is not None and recorded.usage == TokenUsage(3, 5, 8)
    session = await registry.sessions.get_session(TENANT, session_id, touch=False)
    assert session is not None and session.usage == TokenUsage(3, 5, 8)
    assert await registry.usage.tokens_today(TENANT) == 8

    final = await registry.jobs.apply_notice(completed(parent, TokenUsage(1, 1, 2), 2), LIMITS)
    assert final.event is not None and final.event.kind is EventKind.COMPLETED
    assert final.event.data == {
        "result": {"text": "ok"},
        "usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10},
    }
    recorded = await registry.jobs.get_job(TENANT, parent)
    assert recorded is not None and recorded.usage == TokenUsage(4, 6, 10)
    assert recorded.state is JobState.COMPLETED
    session = await registry.sessions.get_session(TENANT, session_id, touch=False)
    assert session is not None and session.usage == TokenUsage(4, 6, 10)
    assert await registry.usage.tokens_today(TENANT) == 10


async def test_a_child_completing_after_its_parent_ended_is_not_rolled_up(
    registry: Backend,
) -> None:
    parent, session_id, hidden = await family(registry)
    child = (await started(registry, job(hidden, parent=parent))).job.job_id
    await registry.jobs.apply_notice(completed(parent, TokenUsage(1, 1, 2), 2), LIMITS)
    await registry.jobs.apply_notice(completed(child, TokenUsage(3, 5, 8)), LIMITS)

    recorded = await registry.jobs.get_job(TENANT, parent)
    assert recorded is not None and recorded.usage == TokenUsage(1, 1, 2)
    session = await registry.sessions.get_session(TENANT, session_id, touch=False)
    assert session is not None and session.usage == TokenUsage(1, 1, 2)
    assert await registry.usage.tokens_today(TENANT) == 10  # the tenant pays for both


async def test_the_calls_session_is_not_in_the_tenants_index(registry: Backend) -> None:
    visible = await new_session(registry)
    await calls_session(registry, new_id())
    page = await registry.sessions.list_sessions(
        TENANT, limit=10, after=None, filter=SessionFilter()
    )
    assert [s.session_id for s in page.items] == [visible]


def test_a_child_keeps_its_parent_when_recorded() -> None:
    new = job("s1", parent="p1")
    assert new.recorded(TENANT, 0, LIMITS).parent_job_id == "p1"
    assert replace(new, parent_job_id="").recorded(TENANT, 0, LIMITS).parent_job_id == ""

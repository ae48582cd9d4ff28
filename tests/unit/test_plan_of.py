"""domain.jobs.plan_of: the plan GetTask shows, settled by the job's state."""

from __future__ import annotations

from dataclasses import replace

import pytest

from domain.agents import AgentConfig, AgentKind
from domain.jobs import Job, JobState, plan_of
from domain.models import Service, WorkKind
from domain.plans import StepName, StepState, plan_for


def job(state: JobState, **changes: object) -> Job:
    base = Job(
        job_id="j",
        tenant_id="acme",
        session_id="s",
        service=Service.QUERY,
        kind=WorkKind.LLM_QUERY,
        state=state,
        request_id="r",
        created_at_ms=1,
        updated_at_ms=1,
        deadline_ms=2,
        heartbeat_deadline_ms=2,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("state", "run"),
    [
        (JobState.QUEUED, StepState.PENDING),
        (JobState.PENDING, StepState.PENDING),
        (JobState.RUNNING, StepState.RUNNING),
        (JobState.COMPLETED, StepState.DONE),
        (JobState.CANCELLED, StepState.SKIPPED),
        (JobState.TIMED_OUT, StepState.SKIPPED),
    ],
)
def test_a_job_without_a_plan_shows_its_one_call(state: JobState, run: StepState) -> None:
    plan = plan_of(job(state))
    assert [(c.name, c.service, c.method, c.state) for c in plan.calls] == [
        (StepName.RUN, Service.QUERY, "SubmitQuery", run)
    ]


def test_a_stored_plan_is_shown_with_its_work_settled_by_the_job() -> None:
    agent = AgentConfig("acme", "a", AgentKind.LLM, 2)
    stored = plan_for(WorkKind.LLM_QUERY, agent, now_ms=5)
    running = stored.with_call(replace(stored.call(StepName.RUN), state=StepState.RUNNING))
    assert plan_of(job(JobState.FINISHING, plan=running)).call(StepName.RUN).state is (
        StepState.DONE
    )
    failed = plan_of(job(JobState.TIMED_OUT, plan=running))
    assert failed.call(StepName.RUN).state is StepState.FAILED
    assert failed.call(StepName.APPEND_HISTORY).state is StepState.PENDING
    assert plan_of(job(JobState.RUNNING, plan=stored)).agent_version == 2

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


def test_the_append_after_the_work_is_settled_by_the_finishing_job() -> None:
    agent = AgentConfig("acme", "a", AgentKind.LLM, 2)
    stored = plan_for(WorkKind.LLM_QUERY, agent, now_ms=5)
    running = stored.with_call(
        replace(stored.call(StepName.RUN), state=StepState.RUNNING, attempts=1, started_ms=6)
    )

    def shown(state: JobState, **changes: object) -> list[tuple[StepName, StepState, int, int]]:
        plan = plan_of(job(state, plan=running, updated_at_ms=9, **changes))
        return [(c.name, c.state, c.started_ms, c.ended_ms) for c in plan.calls[-2:]]

    run_done = (StepName.RUN, StepState.DONE, 6, 8)
    assert shown(JobState.FINISHING, finishing_ms=8) == [
        run_done,
        (StepName.APPEND_HISTORY, StepState.RUNNING, 8, 0),
    ]
    assert shown(JobState.COMPLETED, finishing_ms=8) == [
        run_done,
        (StepName.APPEND_HISTORY, StepState.DONE, 8, 9),
    ]
    completed = plan_of(job(JobState.COMPLETED, plan=running, finishing_ms=8))
    assert completed.call(StepName.APPEND_HISTORY).attempts == 1
    # Ended while appending (cancelled, timed out, its finalize exhausted): the append failed.
    assert shown(JobState.CANCELLED, finishing_ms=8) == [
        run_done,
        (StepName.APPEND_HISTORY, StepState.FAILED, 8, 9),
    ]
    # Ended before the work was done: the append never started.
    assert shown(JobState.TIMED_OUT) == [
        (StepName.RUN, StepState.FAILED, 6, 0),
        (StepName.APPEND_HISTORY, StepState.PENDING, 0, 0),
    ]


def test_what_the_stored_plan_says_finished_stays() -> None:
    agent = AgentConfig("acme", "a", AgentKind.LLM, 2)
    stored = plan_for(WorkKind.LLM_QUERY, agent, now_ms=5)
    error = {"code": "unavailable", "message": "down", "retryable": True}
    failed = stored.with_call(
        replace(stored.call(StepName.APPEND_HISTORY), state=StepState.FAILED, error=error)
    )
    shown = plan_of(job(JobState.FAILED, plan=failed, finishing_ms=8))
    assert shown.call(StepName.APPEND_HISTORY) == failed.call(StepName.APPEND_HISTORY)

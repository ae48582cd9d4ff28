"""Running a job's orchestration plan (domain.plans): the calls before the work and the hand-over
of the work itself (``hand_over``), and the calls after it (``finalize``).

The chat flow (domain.chat) loads the session's agent before the job starts (``load_agent``,
through the injected AgentDirectory, cached by whoever builds it) and stores the plan
``plan_for`` makes with the job. Then:

- ``hand_over`` runs in the job's hand-off task, under its hand-off lease: the pre-steps still
  to do (load_history from Conversation, resolve_tools from Tool Registry for a tool agent) run
  side by side; what they produced (the history window, the tool definitions) is recorded with
  the steps' new states and a ``plan_step`` event for each in one round trip
  (JobStore.record_plan), together with the run step turning RUNNING (no event: the accepted,
  progress and final events tell it); then the work is submitted to its service with the
  agent's snapshot. A claim after this process died resumes at the first step not done, with
  the recorded outputs.
- ``finalize`` runs once the service's completed notice made the job FINISHING, under the
  finalize lease (in the process that applied the notice, or any process's recovery): the
  user's and the assistant's turns are appended to Conversation with the job id as idempotency
  key (a resumed finalize appends them again, stored once), then the job completes with the
  stored result in one round trip. A finalize that succeeds records no step of its own: the
  job's state says where it is (domain.jobs.plan_of).

A call that fails is retried with backoff while it is retryable and the job's deadline allows;
then the job fails with code ``step_failed`` and a message naming the step and the service.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from domain.agents import AgentConfig, ToolDefinition
from domain.conversation import HistoryWindow, Turn, TurnRole
from domain.dispatch import CallContext, Dispatcher, DownstreamError, WorkRequest
from domain.errors import FailedPrecondition, Unavailable
from domain.jobs import (
    EventDraft,
    EventKind,
    HandoffClaim,
    JobLimits,
    NewJob,
    step_failed_error,
)
from domain.models import WorkKind
from domain.plans import OrchestrationPlan, ServiceCall, StepName, StepState, plan_for
from domain.ports.jobs import JobStore
from domain.ports.platform import AgentDirectory, ConversationStore, ToolCatalog

log = logging.getLogger(__name__)

T = TypeVar("T")

# History pages read for one window at most (a window is normally one page).
MAX_HISTORY_PAGES = 20


@dataclass(frozen=True, slots=True)
class PlanPorts:
    """The synchronous platform services plans call."""

    agents: AgentDirectory
    conversation: ConversationStore
    tools: ToolCatalog


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff between attempts of a plan's call to a service that is down: ``first_s``,
    doubling up to ``max_s``, while the job's deadline (less ``reserve``, a share of the job's
    deadline left for failing it with a reason before the reaper times it out) allows."""

    first_s: float = 0.05
    max_s: float = 2.0
    reserve: float = 0.1


# A pre-step as it ended, its output as recorded (JSON values) and as the run takes it.
_PreStepResult = tuple[ServiceCall, dict[str, Any], dict[str, Any]]


class StepFailed(Exception):
    """A plan's call failed for good: ``call`` is the step as it ended (state FAILED)."""

    def __init__(self, call: ServiceCall, error: DownstreamError) -> None:
        super().__init__(error.message)
        self.call = call
        self.error = error

    def job_error(self) -> dict[str, Any]:
        return step_failed_error(
            self.call.name.value,
            self.call.service.value,
            self.error.message,
            retryable=self.error.retryable,
        )


def _now_ms() -> int:
    return int(time.time() * 1000)


def call_error(exc: DownstreamError) -> dict[str, Any]:
    """The {code, message, retryable} error of a service call that failed."""
    return {"code": exc.code, "message": exc.message, "retryable": exc.retryable}


def assistant_text(result: Mapping[str, Any] | None) -> str:
    """The assistant's turn from a completed notice's data (its result's text)."""
    inner = (result or {}).get("result")
    if isinstance(inner, Mapping):
        text = inner.get("text")
        if isinstance(text, str):
            return text
    return ""


class PlanRunner:
    """Runs plans for one process (the chat flow owns the tasks they run in)."""

    def __init__(
        self,
        jobs: JobStore,
        dispatcher: Dispatcher,
        ports: PlanPorts,
        limits: JobLimits,
        *,
        retry: RetryPolicy | None = None,
        clock: Callable[[], int] = _now_ms,
    ) -> None:
        self._jobs = jobs
        self._dispatcher = dispatcher
        self._ports = ports
        self._limits = limits
        self._retry = retry or RetryPolicy()
        self._clock = clock

    # -- before the job starts ------------------------------------------------------------------

    async def load_agent(self, agent_id: str, ctx: CallContext) -> AgentConfig:
        """The session's agent; FailedPrecondition when it no longer exists, Unavailable
        naming Agent Management when it cannot be asked."""
        try:
            agent = await self._ports.agents.get_agent(agent_id, ctx)
        except DownstreamError as exc:
            raise Unavailable(
                f"the agent_management service could not load agent {agent_id}: {exc.message}"
            ) from None
        if agent is None:
            raise FailedPrecondition(f"the session's agent {agent_id} no longer exists")
        return agent

    async def plan(
        self, kind: WorkKind, agent_id: str, ctx: CallContext
    ) -> tuple[OrchestrationPlan, AgentConfig]:
        """The plan for a message of ``kind`` (not an embedding: that needs no agent, and its
        one call is no plan to store) on a session of ``agent_id``, and the agent it was made
        from."""
        agent = await self.load_agent(agent_id, ctx)
        return plan_for(kind, agent, now_ms=self._clock()), agent

    # -- the hand-off ---------------------------------------------------------------------------

    def _deadline(self, deadline_ms: int) -> int:
        """The job's deadline when known (0: a full deadline from now)."""
        return deadline_ms or self._clock() + self._limits.deadline_ms

    async def hand_over(
        self,
        ctx: CallContext,
        job: NewJob,
        outputs: Mapping[str, Any] | None = None,
        *,
        deadline_ms: int = 0,
    ) -> None:
        """Run the plan's pre-steps still to do, record them, and submit the work, retrying
        within the job's deadline (``deadline_ms``; 0: unknown, a full deadline from now). A
        step that fails for good fails the job (step_failed). Registry errors propagate (the
        hand-off lease then runs out and another process resumes)."""
        plan = job.plan
        assert plan is not None
        deadline_ms = self._deadline(deadline_ms)
        found: dict[str, Any] = dict(outputs or {})
        # load_agent ran before the job started, when no event could carry it: the first
        # hand-over (the run never attempted) reports it, so the stream shows every call.
        first = plan.call(StepName.RUN).attempts == 0 and plan.has(StepName.LOAD_AGENT)
        loaded = [plan.call(StepName.LOAD_AGENT)] if first else []
        todo = [
            c
            for c in plan.calls
            if c.name in (StepName.LOAD_HISTORY, StepName.RESOLVE_TOOLS) and not c.state.is_final
        ]
        results = await self._pre_steps(ctx, job, todo, deadline_ms)
        changed: list[ServiceCall] = []
        failed: StepFailed | None = None
        # What this hand-off's pre-steps produced, as the run takes it (what a resumed one
        # found recorded is decoded from ``found``).
        produced: dict[str, Any] = {}
        for result in results:
            if isinstance(result, StepFailed):
                failed = failed or result
                changed.append(result.call)
            elif isinstance(result, BaseException):
                raise result
            else:
                call, output, value = result
                changed.append(call)
                found.update(output)
                produced.update(value)
        for call in changed:
            plan = plan.with_call(call)
        if failed is not None:
            await self._fail(ctx, job, plan, [*loaded, *changed], failed)
            return
        run = plan.call(StepName.RUN)
        run = replace(
            run, state=StepState.RUNNING, attempts=run.attempts + 1, started_ms=self._clock()
        )
        plan = plan.with_call(run)
        # One plan_step event per pre-step that finished (load_agent's on the first hand-over);
        # the run's turning RUNNING is stored (a resume counts its attempts) without one: the
        # accepted, progress and final events already tell the client.
        recorded = await self._jobs.record_plan(
            ctx.tenant_id,
            job.job_id,
            plan,
            [*loaded, *changed],
            outputs=found if todo else None,
        )
        if recorded is None:
            log.info("job %s ended before its work was handed over", job.job_id)
            return
        work = self._work(ctx, job, found, produced)
        try:
            await self._attempts(
                run, deadline_ms, lambda call_ctx: self._dispatcher.submit(work, call_ctx), ctx
            )
        except StepFailed as failed_run:
            await self._fail(
                ctx, job, plan.with_call(failed_run.call), [failed_run.call], failed_run
            )

    async def _pre_steps(
        self, ctx: CallContext, job: NewJob, todo: list[ServiceCall], deadline_ms: int
    ) -> list[_PreStepResult | BaseException]:
        """The pre-steps ``todo``, side by side (one, the usual case, without a task)."""
        if len(todo) == 1:
            try:
                return [await self._pre_step(ctx, job, todo[0], deadline_ms)]
            except StepFailed as failed:
                return [failed]
        return await asyncio.gather(
            *(self._pre_step(ctx, job, call, deadline_ms) for call in todo),
            return_exceptions=True,
        )

    async def _pre_step(
        self, ctx: CallContext, job: NewJob, call: ServiceCall, deadline_ms: int
    ) -> _PreStepResult:
        """The step as it ended, its output as recorded (JSON) and as the run takes it."""
        agent = job.agent
        assert agent is not None
        started = replace(call, started_ms=self._clock())
        if call.name is StepName.LOAD_HISTORY:
            window = HistoryWindow(
                last_turns=agent.limits.max_history_turns,
                token_budget=agent.limits.max_history_tokens,
            )

            async def load(call_ctx: CallContext) -> list[Turn]:
                return await self._history(job.session_id, window, call_ctx)

            turns, attempts = await self._attempts(started, deadline_ms, load, ctx)
            done = replace(
                started,
                state=StepState.DONE,
                attempts=call.attempts + attempts,
                ended_ms=self._clock(),
            )
            return done, {"history": [t.to_json() for t in turns]}, {"history": tuple(turns)}

        async def resolve(call_ctx: CallContext) -> list[ToolDefinition]:
            return await self._ports.tools.resolve(agent.tool_names, call_ctx)

        tools, attempts = await self._attempts(started, deadline_ms, resolve, ctx)
        done = replace(
            started, state=StepState.DONE, attempts=call.attempts + attempts, ended_ms=self._clock()
        )
        return done, {"tools": [t.to_json() for t in tools]}, {"tools": tuple(tools)}

    async def _history(
        self, session_id: str, window: HistoryWindow, ctx: CallContext
    ) -> list[Turn]:
        turns: list[Turn] = []
        token = ""
        for _ in range(MAX_HISTORY_PAGES):
            page = await self._ports.conversation.list_history(
                session_id, ctx, window=window, page_token=token
            )
            turns.extend(page.turns)
            token = page.next_page_token
            if not token:
                break
        return turns

    def _work(
        self,
        ctx: CallContext,
        job: NewJob,
        outputs: Mapping[str, Any],
        produced: Mapping[str, Any],
    ) -> WorkRequest:
        agent = job.agent
        plan = job.plan
        assert plan is not None
        return replace(
            job.work(ctx.tenant_id),
            model=job.model or (agent.model if agent else ""),
            run_service=plan.run_service,
            system_prompt=agent.system_prompt if agent else "",
            history=(
                produced["history"]
                if "history" in produced
                else tuple(Turn.from_json(t) for t in outputs.get("history") or ())
            ),
            tools=(
                produced["tools"]
                if "tools" in produced
                else tuple(ToolDefinition.from_json(t) for t in outputs.get("tools") or ())
            ),
            workflow_id=agent.workflow_id if agent else "",
            max_tool_calls=agent.limits.max_tool_calls if agent else 0,
            agent_version=agent.version if agent else 0,
        )

    # -- after the work -------------------------------------------------------------------------

    async def finalize(self, claim: HandoffClaim, traceparent: str | None = None) -> None:
        """Append the job's turns (once, by job id), then complete it with its stored result:
        the append and one round trip, the finish. Nothing is recorded around the append:
        GetTask's plan (domain.jobs.plan_of) shows the work done and the append running while
        the job is FINISHING, and both done once it completed; the completed event tells the
        client. An append that needed retries records its attempts before the finish; one that
        fails for good fails the job (step_failed naming append_history), recorded with the
        failed call's plan_step event. ``traceparent``: the trace context of the append
        (default: the job's)."""
        job = claim.job
        plan = job.plan
        assert plan is not None
        append = plan.call(StepName.APPEND_HISTORY)
        if append.state is not StepState.DONE:
            plan, append = await self._append(claim, plan, append, traceparent)
            if append.state is not StepState.DONE:
                return  # failed for good: recorded, and the job failed
            # Retried: the attempts are worth a round trip (no event: completed follows).
            retried = append.attempts > 1
            if (
                retried
                and await self._jobs.record_plan(claim.tenant_id, job.job_id, plan, []) is None
            ):
                return  # ended meanwhile (cancelled, timed out)
        draft = EventDraft(job.job_id, EventKind.COMPLETED, job.request_id, {})
        await self._jobs.finish_job(claim.tenant_id, job.job_id, draft, self._limits)

    async def _append(
        self,
        claim: HandoffClaim,
        plan: OrchestrationPlan,
        append: ServiceCall,
        traceparent: str | None,
    ) -> tuple[OrchestrationPlan, ServiceCall]:
        """Append the job's turns: the plan and the append call as they ended (DONE, or FAILED
        with the job failed)."""
        job = claim.job
        ctx = CallContext(
            tenant_id=claim.tenant_id,
            request_id=job.request_id,
            traceparent=traceparent or job.traceparent or None,
        )
        deadline_ms = self._deadline(claim.deadline_ms)
        now = self._clock()
        run = plan.call(StepName.RUN)
        if not run.state.is_final:
            plan = plan.with_call(replace(run, state=StepState.DONE, ended_ms=now))
        append = replace(append, state=StepState.RUNNING, started_ms=now)
        turns = [
            Turn(TurnRole.USER, job.content, job.job_id, now),
            Turn(TurnRole.ASSISTANT, assistant_text(claim.result), job.job_id, now),
        ]

        async def append_turns(call_ctx: CallContext) -> None:
            await self._ports.conversation.append_turns(job.session_id, job.job_id, turns, call_ctx)

        try:
            _, attempts = await self._attempts(append, deadline_ms, append_turns, ctx)
        except StepFailed as failed:
            plan = plan.with_call(failed.call)
            await self._fail(ctx, job, plan, [failed.call], failed)
            return plan, failed.call
        append = replace(
            append,
            state=StepState.DONE,
            attempts=append.attempts + attempts,
            ended_ms=self._clock(),
        )
        return plan.with_call(append), append

    # -- calls, retries, failure ----------------------------------------------------------------

    async def _attempts(
        self,
        call: ServiceCall,
        deadline_ms: int,
        attempt: Callable[[CallContext], Awaitable[T]],
        ctx: CallContext,
    ) -> tuple[T, int]:
        """Call until it answers, a failure is not retryable, or the job's deadline (less the
        reserve) leaves no room for another attempt; returns the answer and the attempts
        made, or raises StepFailed with the call as it ended."""
        retry = self._retry
        give_up_ms = deadline_ms - int(self._limits.deadline_ms * retry.reserve)
        delay = retry.first_s
        attempts = 0
        while True:
            attempts += 1
            # Each attempt may take until the job's deadline; another one starts only before
            # the reserve kept for failing the job with a reason.
            left_s = max((deadline_ms - self._clock()) / 1000, 0.001)
            call_ctx = replace(ctx, timeout_s=left_s)
            try:
                return await attempt(call_ctx), attempts
            except DownstreamError as exc:
                late = self._clock() + delay * 1000 >= give_up_ms
                if not exc.retryable or late:
                    failed = replace(
                        call,
                        state=StepState.FAILED,
                        attempts=call.attempts + attempts,
                        ended_ms=self._clock(),
                        error=call_error(exc),
                    )
                    raise StepFailed(failed, exc) from None
                log.info(
                    "%s (%s) attempt %d failed: %s; trying again in %.2fs",
                    call.name.value,
                    call.service.value,
                    attempts,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, retry.max_s)

    async def _fail(
        self,
        ctx: CallContext,
        job: NewJob,
        plan: OrchestrationPlan,
        changed: list[ServiceCall],
        failed: StepFailed,
    ) -> None:
        """Record the plan as it ended and fail the job naming the step and its service."""
        log.warning(
            "job %s failed: step %s (%s): %s",
            job.job_id,
            failed.call.name.value,
            failed.call.service.value,
            failed.error,
        )
        await self._jobs.record_plan(ctx.tenant_id, job.job_id, plan, changed)
        draft = EventDraft(
            job.job_id, EventKind.FAILED, job.request_id, {"error": failed.job_error()}
        )
        await self._jobs.finish_job(ctx.tenant_id, job.job_id, draft, self._limits)


def runs_plan(job: NewJob) -> bool:
    """Whether the job's hand-off goes through a plan (it has calls besides the work)."""
    plan = job.plan
    return plan is not None and len(plan.calls) > 1 and job.agent is not None

"""The job store: jobs, their sessions' bookkeeping and the session event log, changed
atomically together (registry.redis_jobs on Redis, registry.memory_jobs in memory;
tests/registry runs one contract suite against both)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from domain import jobs
from domain.plans import OrchestrationPlan, ServiceCall
from domain.service_caps import LimitReached


class JobStore(Protocol):
    """Jobs, their sessions' bookkeeping and the session event log, changed atomically together.

    Every method that changes a job also appends the matching SessionEvent to the session's log
    and publishes it to every process following the session."""

    async def start_job(
        self,
        tenant_id: str,
        new: jobs.NewJob,
        limits: jobs.JobLimits,
        *,
        if_busy: jobs.IfBusy,
        hold: bool = False,
    ) -> jobs.StartedJob | jobs.StartRefused | LimitReached:
        """Record a job on an open session (which becomes BUSY, counts the message and lists
        the job as in flight) and append its accepted event. The job is PENDING, or QUEUED at
        the back of the session's line (accepted data ``queued: true``) when ``hold`` is set or
        the session is busy and ``if_busy`` is HOLD.
        A PENDING job turns RUNNING with the service's first notice.

        The job's work spec (``new``, collections and priority included) is kept with it until
        it is handed over, and the job is due for a hand-off check ``limits.handoff_grace_ms``
        after the start (its first hand-off's lease), in the same atomic step or round trip:
        see ``claim_handoffs``. For a QUEUED job that first hand-off is its enqueue on the
        ``chat`` work queue, confirmed by ``enqueue_done``.

        A job that would be PENDING is checked against its tenant's limits toward its service
        (``limits.caps``: jobs in flight at the service, tokens charged this minute) and
        counted in flight, in the same atomic step: over a limit nothing is recorded and the
        answer is LimitReached (domain.service_caps). A QUEUED job is checked when it is
        activated."""
        ...

    async def start_on_session(
        self,
        tenant_id: str,
        new: jobs.NewJob,
        limits: jobs.JobLimits,
        *,
        if_busy: jobs.IfBusy,
        hold: bool = False,
    ) -> jobs.StartedJob | jobs.SessionNotOpen | jobs.StartRefused | LimitReached:
        """``start_job`` for a job on its session's agent (``new.agent_id`` is not used: the
        recorded job's agent is the session's), with the session read as
        ``SessionStore.get_session(touch=True)`` reads it (an open one's expiry slides from now,
        an open one past its expiry turns EXPIRED) in the same atomic step, after the job id
        was found new: a message's session check and start in one round trip. A session that
        is missing (or another tenant's) is StartRefused.SESSION_MISSING; one that is not open
        is ``SessionNotOpen`` with its state. Not for an internal call's job
        (``new.parent_job_id`` must be empty)."""
        ...

    async def renew_handoff(self, tenant_id: str, job_id: str, limits: jobs.JobLimits) -> bool:
        """Extend the lease of a hand-off (or of a QUEUED job's enqueue) in progress to
        ``limits.handoff_grace_ms`` from now; False (and no change) when the job is no longer
        waiting for one."""
        ...

    async def enqueue_done(self, tenant_id: str, job_id: str) -> None:
        """A QUEUED job's work item is on the work queue: its enqueue is no longer claimed
        (its work spec stays until the job is handed over). Activating the job does the same."""
        ...

    async def handoff_done(self, tenant_id: str, job_id: str) -> None:
        """The job reached its service (or ended): drop its work spec and hand-off check. The
        service's first notice and every final state do the same."""
        ...

    async def handoffs_done(self, done: Sequence[tuple[str, str]]) -> None:
        """``handoff_done`` for each ``(tenant_id, job_id)`` of ``done``, in one round trip
        (unknown jobs, jobs of another tenant and jobs not waiting for a hand-off are
        skipped)."""
        ...

    async def claim_handoffs(
        self, limits: jobs.JobLimits, *, limit: int
    ) -> list[jobs.HandoffClaim]:
        """Up to ``limit`` jobs whose hand-off lease ran out without confirmation (PENDING
        jobs not handed over, QUEUED jobs not confirmed enqueued: ``requeue``), each claimed
        atomically (a new lease of ``limits.handoff_grace_ms``, the attempt counted), so one
        process redoes each. A job that has had ``limits.handoff_attempts`` hand-offs or is
        past its deadline is failed ``handoff_failed`` by the claim, in the same atomic step
        (the claim is ``exhausted``): a notice from an earlier hand-off either comes before it
        (the job is RUNNING and not claimed) or finds the job finished.

        FINISHING jobs whose finalize lease ran out are claimed alike (``finalize``, with the
        stored result); an exhausted one fails ``step_failed`` naming append_history."""
        ...

    async def record_plan(
        self,
        tenant_id: str,
        job_id: str,
        plan: OrchestrationPlan,
        steps: Sequence[ServiceCall],
        *,
        outputs: Mapping[str, Any] | None = None,
    ) -> list[jobs.SessionEvent] | None:
        """Store an unfinished job's plan as it now is and append a ``plan_step`` event for
        each of ``steps`` (its calls whose state changed), with ``outputs`` (what finished
        pre-steps produced for the run, returned with a later hand-off claim) when given, all
        in one atomic step and one round trip. None (and no change) when the job has ended or
        is not this tenant's; else the appended events."""
        ...

    async def activate_job(
        self, tenant_id: str, job_id: str, limits: jobs.JobLimits
    ) -> jobs.ActivateOutcome | LimitReached:
        """Turn a QUEUED job PENDING (fresh deadlines) if it is first in its session's line,
        no job accepted before it is still in flight and its tenant is under the limits toward
        its service (checked and counted as ``start_job`` does; LimitReached: it stays QUEUED,
        its enqueue confirmed); otherwise say why not."""
        ...

    async def apply_notice(self, notice: jobs.Notice, limits: jobs.JobLimits) -> jobs.NoticeOutcome:
        """Check a notice against its job (tenant, service, order, state) and apply it. A
        completed notice on a job whose plan appends history turns it FINISHING (result and
        usage stored, usage charged, a finalize lease held for the caller: the outcome's
        ``finishing`` claim; no event), all in one atomic step."""
        ...

    async def apply_notices(
        self, notices: Sequence[jobs.Notice], limits: jobs.JobLimits
    ) -> list[jobs.NoticeOutcome | Exception]:
        """Apply notices that arrived together, each exactly as ``apply_notice`` would, in
        their order (those about one job one after the other), in one round trip: each notice
        its own outcome, in the order given, or the error applying that notice alone (the
        others are applied regardless). Raises when none could be applied (the store
        unreachable)."""
        ...

    async def finish_job(
        self, tenant_id: str, job_id: str, draft: jobs.EventDraft, limits: jobs.JobLimits
    ) -> tuple[jobs.FinishOutcome, jobs.SessionEvent | None]:
        """End an unfinished job as cancelled or failed (draft.kind), or completed from the
        embedding cache, from the orchestrator's side. A FINISHING job completed this way
        completes with its stored result (the draft's data is not used)."""
        ...

    async def get_job(self, tenant_id: str, job_id: str) -> jobs.Job | None:
        """A job of this tenant, or None."""
        ...

    async def reap_expired(self, limits: jobs.JobLimits, *, limit: int) -> list[jobs.SessionEvent]:
        """Mark up to ``limit`` jobs past their deadline TIMED_OUT (each exactly once, even
        with several processes reaping) and return their timed_out events."""
        ...

    async def list_tenant_jobs(
        self,
        tenant_id: str,
        *,
        before: tuple[int, str] | None,
        created_from_ms: int | None,
        created_to_ms: int | None,
        limit: int,
    ) -> list[tuple[int, str]]:
        """Up to ``limit`` (created ms, job id) of the tenant's jobs, newest first (by created
        time, then id), created in [``created_from_ms``, ``created_to_ms``) and strictly
        after ``before`` in that order. The index is trimmed to the longest a job is kept
        (queue timeout + deadline + retention): an entry may name a job whose record expired
        sooner (``get_jobs`` returns None for it)."""
        ...

    async def get_jobs(self, tenant_id: str, job_ids: Sequence[str]) -> list[jobs.Job | None]:
        """``get_job`` of each id, in one round trip."""
        ...

    async def tenants_started_since(self, since_ms: int) -> set[str]:
        """Tenants that started a job since ``since_ms`` (by UTC day on Redis: every tenant
        that started one on the day of ``since_ms`` or later; kept three days)."""
        ...

    async def count_unfinished_of(self, tenant_id: str) -> dict[jobs.JobState, int]:
        """``count_unfinished`` for one tenant."""
        ...

    async def count_unfinished(self) -> dict[jobs.JobState, int]:
        """How many jobs of all tenants are in each unfinished state (domain.jobs
        UNFINISHED_STATES, every one a key, zero included) now, as every process sharing the
        backend sees it. Jobs whose record expired unfinished are not counted."""
        ...

"""The storage interfaces the domain layer depends on. Backends implement them exactly alike;
tests/registry runs one contract suite against every backend."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Protocol

from domain.jobs import (
    ActivateOutcome,
    EventDraft,
    EventPage,
    FinishOutcome,
    HandoffClaim,
    IfBusy,
    Job,
    JobLimits,
    JobState,
    NewJob,
    Notice,
    NoticeOutcome,
    SessionEvent,
    StartedJob,
    StartRefused,
)
from domain.models import NewSession, Page, Session, SessionFilter
from registry.fanout import Feed, LocalFanout

if TYPE_CHECKING:
    from domain.api_keys import ApiKey
    from domain.usage import DayUsage
from domain.rate_limits import Bucket, RateDecision


class SessionStore(Protocol):
    """Sessions of all tenants. Every method is scoped to one tenant: a session stored under
    another tenant is invisible (reads as missing)."""

    async def create_session(self, tenant_id: str, session_id: str, new: NewSession) -> Session:
        """Store a new ACTIVE session expiring ``new.ttl_ms`` from now."""
        ...

    async def get_session(self, tenant_id: str, session_id: str, *, touch: bool) -> Session | None:
        """Read a session, or None when missing. An open session past its expiry reads (and is
        recorded) as EXPIRED; with ``touch`` an open session's expiry slides to now + ttl."""
        ...

    async def list_sessions(
        self, tenant_id: str, *, limit: int, after: str | None, filter: SessionFilter
    ) -> Page[Session]:
        """Up to ``limit`` matching sessions, newest first, strictly older than the session id
        ``after``. ``next_cursor`` is the id to pass as ``after`` for the next page."""
        ...

    async def close_session(self, tenant_id: str, session_id: str) -> Session | None:
        """Close an open session and return it; a closed or expired session is returned as it
        is; None when missing."""
        ...


class Backend(Protocol):
    """Lifecycle of a storage backend, for health checks and shutdown."""

    name: str

    async def ping(self) -> None:
        """Raise domain.errors.Unavailable when the backend cannot serve requests."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class JobStore(Protocol):
    """Jobs, their sessions' bookkeeping and the session event log, changed atomically together.

    Every method that changes a job also appends the matching SessionEvent to the session's log
    and publishes it to every process following the session."""

    async def start_job(
        self, tenant_id: str, new: NewJob, limits: JobLimits, *, if_busy: IfBusy, hold: bool = False
    ) -> StartedJob | StartRefused:
        """Record a job on an open session (which becomes BUSY, counts the message and lists
        the job as in flight) and append its accepted event. The job is PENDING, or QUEUED at
        the back of the session's line (accepted data ``queued: true``) when ``hold`` is set or
        the session is busy and ``if_busy`` is HOLD.
        A PENDING job turns RUNNING with the service's first notice.

        The job's work spec (``new``, collections and priority included) is kept with it until
        it is handed over, and the job is due for a hand-off check ``limits.handoff_grace_ms``
        after the start (its first hand-off's lease), in the same atomic step or round trip:
        see ``claim_handoffs``. For a QUEUED job that first hand-off is its enqueue on the
        ``chat`` work queue, confirmed by ``enqueue_done``."""
        ...

    async def renew_handoff(self, tenant_id: str, job_id: str, limits: JobLimits) -> bool:
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

    async def claim_handoffs(self, limits: JobLimits, *, limit: int) -> list[HandoffClaim]:
        """Up to ``limit`` jobs whose hand-off lease ran out without confirmation (PENDING
        jobs not handed over, QUEUED jobs not confirmed enqueued: ``requeue``), each claimed
        atomically (a new lease of ``limits.handoff_grace_ms``, the attempt counted), so one
        process redoes each. A job that has had ``limits.handoff_attempts`` hand-offs or is
        past its deadline is failed ``handoff_failed`` by the claim, in the same atomic step
        (the claim is ``exhausted``): a notice from an earlier hand-off either comes before it
        (the job is RUNNING and not claimed) or finds the job finished."""
        ...

    async def activate_job(self, tenant_id: str, job_id: str, limits: JobLimits) -> ActivateOutcome:
        """Turn a QUEUED job PENDING (fresh deadlines) if it is first in its session's line
        and no job accepted before it is still in flight; otherwise say why not."""
        ...

    async def apply_notice(self, notice: Notice, limits: JobLimits) -> NoticeOutcome:
        """Check a notice against its job (tenant, service, order, state) and apply it."""
        ...

    async def finish_job(
        self, tenant_id: str, job_id: str, draft: EventDraft, limits: JobLimits
    ) -> tuple[FinishOutcome, SessionEvent | None]:
        """End an unfinished job as cancelled or failed (draft.kind), or completed from the
        embedding cache, from the orchestrator's side."""
        ...

    async def get_job(self, tenant_id: str, job_id: str) -> Job | None:
        """A job of this tenant, or None."""
        ...

    async def reap_expired(self, limits: JobLimits, *, limit: int) -> list[SessionEvent]:
        """Mark up to ``limit`` jobs past their deadline TIMED_OUT (each exactly once, even
        with several processes reaping) and return their timed_out events."""
        ...

    async def count_unfinished(self) -> dict[JobState, int]:
        """How many jobs of all tenants are in each unfinished state (domain.jobs
        UNFINISHED_STATES, every one a key, zero included) now, as every process sharing the
        backend sees it. Jobs whose record expired unfinished are not counted."""
        ...


class EventLog(Protocol):
    """Reading a session's retained events and following new ones."""

    # The feeds of this process's client streams (to end them all on shutdown).
    fanout: LocalFanout

    async def read_after(
        self, tenant_id: str, session_id: str, after: int, *, limit: int
    ) -> EventPage:
        """Up to ``limit`` retained events with sequence > ``after``, oldest first."""
        ...

    def subscribe(self, tenant_id: str, session_id: str) -> AbstractAsyncContextManager[Feed]:
        """Follow live events. On entry the subscription is in effect: every event appended
        afterwards is delivered to the feed (or the feed is marked lagging)."""
        ...

    async def aclose(self) -> None:
        """Stop following (the per-process reader) and release its connection."""
        ...


class ApiKeyStore(Protocol):
    """API key records of all tenants, by key id, with a per-tenant listing. Stores never see
    a plaintext secret, only its hash (domain.api_keys)."""

    async def add_key(self, key: ApiKey) -> ApiKey | None:
        """Store a new key, stamping its creation time; None (and no change) when a key with
        that id exists already."""
        ...

    async def get_key(self, key_id: str) -> ApiKey | None:
        """The key with this id (revoked or not), or None."""
        ...

    async def get_keys(self, key_ids: Sequence[str]) -> list[ApiKey | None]:
        """The keys with these ids, in the same order (None where missing), in one read."""
        ...

    async def list_keys(self, tenant_id: str, *, limit: int, after: str | None) -> Page[ApiKey]:
        """Up to ``limit`` of the tenant's keys in ascending key id order, strictly after the
        key id ``after``. ``next_cursor`` is the id to pass as ``after`` for the next page."""
        ...

    async def revoke_key(self, key_id: str) -> ApiKey | None:
        """Mark a key revoked (keeping the first revocation time) and return it; None when
        missing."""


class RateLimiter(Protocol):
    """Request-rate limits (domain.rate_limits, GCRA) shared by every replica using the
    backend. All buckets of one call belong to one tenant."""

    async def acquire(self, buckets: Sequence[Bucket]) -> RateDecision:
        """Take one request from every bucket, atomically: either all allow it and all are
        charged, or none is charged and the decision names the bucket that needs the longest
        wait. Raises domain.errors.Unavailable when the backend cannot be reached."""
        ...


class UsageStore(Protocol):
    """Token usage per tenant and UTC day (days since the epoch), with per-agent totals. The
    job store adds to it atomically with each completed notice; this interface reads it."""

    async def usage_days(self, tenant_id: str, first_day: int, last_day: int) -> list[DayUsage]:
        """The days from ``first_day`` to ``last_day`` (inclusive) that have usage, oldest
        first."""
        ...

    async def tokens_today(self, tenant_id: str) -> int:
        """The tenant's total tokens of the current UTC day (by the backend's clock)."""
        ...


class EmbeddingCache(Protocol):
    """Embedding results by tenant and cache key (domain.embedding_cache builds the key),
    shared by every replica using the backend."""

    async def get_result(self, tenant_id: str, key: str) -> str | None:
        """The cached result (JSON), or None when missing or expired."""
        ...

    async def put_result(self, tenant_id: str, key: str, result_json: str, ttl_ms: int) -> None:
        """Store a result for ``ttl_ms`` milliseconds (replacing any older one)."""
        ...

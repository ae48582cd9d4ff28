"""The storage interfaces the domain layer depends on. Backends implement them exactly alike;
tests/registry runs one contract suite against every backend."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from domain.models import NewSession, Page, Session, SessionFilter
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


class RateLimiter(Protocol):
    """Request-rate limits (domain.rate_limits, GCRA) shared by every replica using the
    backend. All buckets of one call belong to one tenant."""

    async def acquire(self, buckets: Sequence[Bucket]) -> RateDecision:
        """Take one request from every bucket, atomically: either all allow it and all are
        charged, or none is charged and the decision names the bucket that needs the longest
        wait. Raises domain.errors.Unavailable when the backend cannot be reached."""
        ...

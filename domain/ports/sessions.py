"""The session store (registry.redis_sessions on Redis, registry.memory_sessions in memory;
tests/registry runs one contract suite against both)."""

from __future__ import annotations

from typing import Protocol

from domain.models import NewSession, Page, Session, SessionFilter


class SessionStore(Protocol):
    """Sessions of all tenants. Every method is scoped to one tenant: a session stored under
    another tenant is invisible (reads as missing)."""

    async def create_session(self, tenant_id: str, session_id: str, new: NewSession) -> Session:
        """Store a new ACTIVE session expiring ``new.ttl_ms`` from now."""
        ...

    async def open_session(self, tenant_id: str, session_id: str, new: NewSession) -> Session:
        """The session ``session_id`` as it is when open; else (missing, closed or past its
        expiry) a new one stored in its place as ``create_session`` stores it. One atomic step:
        callers racing for the same id all get the one session."""
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

"""The storage interfaces the domain layer depends on. Backends implement them exactly alike;
tests/registry runs one contract suite against every backend."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from domain.models import NewSession, Page, Session, SessionFilter

if TYPE_CHECKING:
    from domain.api_keys import ApiKey


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

    async def list_keys(self, tenant_id: str, *, limit: int, after: str | None) -> Page[ApiKey]:
        """Up to ``limit`` of the tenant's keys in ascending key id order, strictly after the
        key id ``after``. ``next_cursor`` is the id to pass as ``after`` for the next page."""
        ...

    async def revoke_key(self, key_id: str) -> ApiKey | None:
        """Mark a key revoked (keeping the first revocation time) and return it; None when
        missing."""
        ...

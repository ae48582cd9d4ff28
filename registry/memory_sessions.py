"""Sessions in process memory: the embedded default when no Redis is configured.

Single-process only (nothing is shared between replicas and nothing survives a restart); it
implements domain.ports.sessions.SessionStore with the same semantics as the Redis backend,
which the shared contract tests check.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import replace

from domain.models import NewSession, Page, Session, SessionFilter, SessionState


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class MemorySessionStore:
    """domain.ports.sessions.SessionStore in a dict."""

    def __init__(
        self,
        *,
        retention_ms: int,
        clock: Callable[[], int] = wall_clock_ms,
        on_close: Callable[[str, str], None] | None = None,
    ) -> None:
        self._retention_ms = retention_ms
        self._clock = clock
        self._on_close = on_close
        self._sessions: dict[tuple[str, str], Session] = {}
        self._index: dict[str, list[str]] = {}  # tenant -> session ids, ascending

    async def create_session(self, tenant_id: str, session_id: str, new: NewSession) -> Session:
        now = self._clock()
        session = Session(
            session_id=session_id,
            tenant_id=tenant_id,
            agent_id=new.agent_id,
            user_id=new.user_id,
            state=SessionState.ACTIVE,
            metadata=dict(new.metadata),
            created_at_ms=now,
            updated_at_ms=now,
            expires_at_ms=now + new.ttl_ms,
            ttl_ms=new.ttl_ms,
        )
        self._sessions[(tenant_id, session_id)] = session
        if not new.hidden:
            bisect.insort(self._index.setdefault(tenant_id, []), session_id)
        return session

    async def open_session(self, tenant_id: str, session_id: str, new: NewSession) -> Session:
        session = self._current(tenant_id, session_id)
        if session is not None and session.state.is_open:
            return session
        return await self.create_session(tenant_id, session_id, new)

    async def get_session(self, tenant_id: str, session_id: str, *, touch: bool) -> Session | None:
        session = self._current(tenant_id, session_id)
        if session is not None and touch and session.state.is_open:
            session = replace(session, expires_at_ms=self._clock() + session.ttl_ms)
            self._sessions[(tenant_id, session_id)] = session
        return session

    async def close_session(self, tenant_id: str, session_id: str) -> Session | None:
        session = self._current(tenant_id, session_id)
        if session is not None and session.state.is_open:
            session = replace(session, state=SessionState.CLOSED, updated_at_ms=self._clock())
            self._sessions[(tenant_id, session_id)] = session
            if self._on_close is not None:
                self._on_close(tenant_id, session_id)
        return session

    def peek(self, tenant_id: str, session_id: str) -> Session | None:
        """The session as of now, without sliding its expiry (for the memory job store)."""
        return self._current(tenant_id, session_id)

    def put(self, session: Session) -> None:
        """Replace a stored session (for the memory job store)."""
        self._sessions[(session.tenant_id, session.session_id)] = session

    async def list_sessions(
        self, tenant_id: str, *, limit: int, after: str | None, filter: SessionFilter
    ) -> Page[Session]:
        ids = self._index.get(tenant_id, [])
        end = bisect.bisect_left(ids, after) if after else len(ids)
        found: list[Session] = []
        for position in range(end - 1, -1, -1):
            session = self._current(tenant_id, ids[position])
            if session is None or not filter.matches(session):
                continue
            found.append(session)
            if len(found) == limit:
                return Page(found, session.session_id if position > 0 else None)
        return Page(found, None)

    def _current(self, tenant_id: str, session_id: str) -> Session | None:
        """The session as of now: expired when past its expiry, gone after retention."""
        key = (tenant_id, session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self._clock()
        if session.state.is_open and now >= session.expires_at_ms:
            session = replace(
                session, state=SessionState.EXPIRED, updated_at_ms=session.expires_at_ms
            )
            self._sessions[key] = session
        if not session.state.is_open and now >= session.updated_at_ms + self._retention_ms:
            del self._sessions[key]
            ids = self._index[tenant_id]
            ids.pop(bisect.bisect_left(ids, session_id))
            return None
        return session

"""Following a session's events: the event log (registry.redis_events on Redis,
registry.memory_jobs in memory) and the live feed one client stream reads from
(registry.fanout.Feed)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from domain.jobs import EventPage, SessionEvent


class Feed(Protocol):
    """Live events of one session for one client stream, bounded: when it overflows (or its
    source reconnects) it drops what it holds and is marked lagging, and the stream catches up
    from the log."""

    @property
    def key(self) -> tuple[str, str]:
        """(tenant, session) followed."""
        ...

    @property
    def lagging(self) -> bool:
        """Events were dropped: catch up from the log, then ``clear_lagging``."""
        ...

    @property
    def closed(self) -> bool:
        """The session was closed (or the server is stopping): end once caught up."""
        ...

    @property
    def recheck(self) -> bool:
        """The backend lost its data: check the session (and job) still exist, then
        ``clear_recheck``."""
        ...

    async def wait(self, within_s: float | None = None) -> bool:
        """Wait until something is available (events, lag, recheck or close); False when
        nothing came within ``within_s`` seconds."""
        ...

    def drain(self) -> list[SessionEvent]:
        """Take every buffered event."""
        ...

    async def shared_check(self, check: Callable[[], Awaitable[bool]], max_age_s: float) -> bool:
        """``check()``'s answer, or the one another stream following the same session in this
        process got at most ``max_age_s`` ago (or is getting now)."""
        ...

    def clear_lagging(self) -> None:
        """The stream has caught up from the log."""
        ...

    def clear_recheck(self) -> None:
        """The stream has checked what it follows still exists."""
        ...

    def mark_closed(self) -> None:
        """End the stream once it has caught up."""
        ...


class EventLog(Protocol):
    """Reading a session's retained events and following new ones."""

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

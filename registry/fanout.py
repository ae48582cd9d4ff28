"""In-process fan-out of session events to the client streams of this process.

One reader per process (Redis pub/sub, or the memory backend directly) hands each event to
``LocalFanout.deliver``, which puts it into the bounded Feed of every stream following that
session. Delivery never waits: a stream whose feed is full is marked lagging and catches up
from the event log on its own, so a slow client never holds back the reader or other clients.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

from domain.jobs import SessionEvent

DEFAULT_FEED_CAPACITY = 256


class Feed:
    """Live events of one session for one client stream (domain.ports.events.Feed)."""

    __slots__ = ("_capacity", "_events", "_wakeup", "closed", "key", "lagging", "recheck")

    def __init__(self, key: tuple[str, str], capacity: int = DEFAULT_FEED_CAPACITY) -> None:
        self.key = key
        self._capacity = capacity
        self._events: deque[SessionEvent] = deque()
        self._wakeup = asyncio.Event()
        # Events were dropped (full feed, or the reader reconnected): catch up from the log.
        self.lagging = False
        # The session was closed: the stream should end once it has caught up.
        self.closed = False
        # The backend lost its data: the stream should check its session (and job) still
        # exist (server.data_loss).
        self.recheck = False

    def put(self, event: SessionEvent) -> None:
        if len(self._events) >= self._capacity:
            self._events.clear()
            self.lagging = True
        else:
            self._events.append(event)
        self._wakeup.set()

    def mark_lagging(self) -> None:
        self.lagging = True
        self._wakeup.set()

    def clear_lagging(self) -> None:
        self.lagging = False

    def mark_closed(self) -> None:
        self.closed = True
        self._wakeup.set()

    def mark_recheck(self) -> None:
        """Re-read the log and check the session still exists (its data may be gone)."""
        self.recheck = True
        self.lagging = True
        self._wakeup.set()

    def clear_recheck(self) -> None:
        self.recheck = False

    async def wait(self, within_s: float | None = None) -> bool:
        """Wait until something is available (events, lag or close); False when nothing came
        within ``within_s`` seconds."""
        if self._events or self.lagging or self.closed or self.recheck:
            return True
        self._wakeup.clear()
        # asyncio.timeout, not wait_for: no extra task per wake-up (this runs once per event
        # per stream, the hottest wait of the fan-out).
        try:
            async with asyncio.timeout(within_s):
                await self._wakeup.wait()
        except TimeoutError:
            return False
        return True

    def drain(self) -> list[SessionEvent]:
        """Take every buffered event."""
        events = list(self._events)
        self._events.clear()
        return events


class LocalFanout:
    """Which feeds follow which (tenant, session) in this process."""

    def __init__(self) -> None:
        self._feeds: dict[tuple[str, str], set[Feed]] = {}

    def add(self, feed: Feed) -> bool:
        """Register a feed; True when it is the first for its session."""
        feeds = self._feeds.setdefault(feed.key, set())
        feeds.add(feed)
        return len(feeds) == 1

    def remove(self, feed: Feed) -> bool:
        """Unregister a feed; True when it was the last for its session."""
        feeds = self._feeds.get(feed.key)
        if feeds is None:
            return False
        feeds.discard(feed)
        if feeds:
            return False
        del self._feeds[feed.key]
        return True

    def has(self, key: tuple[str, str]) -> bool:
        return key in self._feeds

    def sessions(self) -> Iterable[tuple[str, str]]:
        return list(self._feeds)

    def deliver(self, key: tuple[str, str], event: SessionEvent) -> None:
        for feed in self._feeds.get(key, ()):
            feed.put(event)

    def close_session(self, key: tuple[str, str]) -> None:
        for feed in self._feeds.get(key, ()):
            feed.mark_closed()

    def mark_all_lagging(self) -> None:
        for feeds in self._feeds.values():
            for feed in feeds:
                feed.mark_lagging()

    def recheck_all(self) -> None:
        """Every stream of this process checks that what it follows still exists (the
        backend lost its data)."""
        for feeds in self._feeds.values():
            for feed in feeds:
                feed.mark_recheck()

    def close_all(self) -> None:
        """End every stream of this process once it has caught up (server shutdown)."""
        for feeds in self._feeds.values():
            for feed in feeds:
                feed.mark_closed()

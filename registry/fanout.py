"""In-process fan-out of session events to the client streams of this process.

One reader per process (Redis pub/sub, or the memory backend directly) hands each event to
``LocalFanout.deliver``, which puts it into the bounded Feed of every stream following that
session. Delivery never waits: a stream whose feed is full is marked lagging and catches up
from the event log on its own, so a slow client never holds back the reader or other clients.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Awaitable, Callable, Iterable

from domain.jobs import SessionEvent

DEFAULT_FEED_CAPACITY = 256
# The granularity of the feeds' wait deadlines (Deadlines): a wait with a deadline ends at most
# this much after it.
DEADLINE_SLOT_S = 0.02


class Deadlines:
    """The wait deadlines of many feeds kept by one timer instead of one timer each (every
    idle stream waits with a deadline, and a timer handle is the largest thing it would hold
    of its own). Feeds are grouped in slots of DEADLINE_SLOT_S; the timer is armed for the
    earliest slot, and a feed found there is asked whether its wait is due (Feed._expire), which
    may place it again. A feed whose stream ends leaves its slot (nothing keeps it alive)."""

    __slots__ = ("_heap", "_loop", "_slots", "_timer", "_timer_slot")

    def __init__(self) -> None:
        self._slots: dict[int, set[Feed]] = {}
        self._heap: list[int] = []  # the slots' numbers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_slot = 0

    def add(self, loop: asyncio.AbstractEventLoop, feed: Feed, deadline: float) -> int:
        """Keep ``deadline`` for ``feed``: the slot it is in (never 0)."""
        if loop is not self._loop:  # first use, or a new loop: the old one's waits are gone
            if self._timer is not None:
                self._timer.cancel()
            self._slots, self._heap, self._loop, self._timer = {}, [], loop, None
        slot = math.ceil(deadline / DEADLINE_SLOT_S)
        feeds = self._slots.get(slot)
        if feeds is not None:
            feeds.add(feed)
            return slot
        self._slots[slot] = {feed}
        heap = self._heap
        heapq.heappush(heap, slot)
        # The earliest slot, not this one: a feed placed again while the timer fires may go
        # after slots still waiting.
        if self._timer is None or heap[0] < self._timer_slot:
            self._arm(loop, heap[0])
        return slot

    def remove(self, feed: Feed, slot: int) -> None:
        """``feed`` no longer waits (its slot stays, maybe empty, until due)."""
        feeds = self._slots.get(slot)
        if feeds is not None:
            feeds.discard(feed)

    def held(self) -> int:
        """How many feeds are in slots (for tests)."""
        return sum(len(feeds) for feeds in self._slots.values())

    def _arm(self, loop: asyncio.AbstractEventLoop, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_slot = slot
        self._timer = loop.call_at(slot * DEADLINE_SLOT_S, self._fire)

    def _fire(self) -> None:
        self._timer = None
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        heap, slots = self._heap, self._slots
        due: list[Feed] = []
        while heap and heap[0] * DEADLINE_SLOT_S <= now + 0.001:
            due.extend(slots.pop(heapq.heappop(heap)))
        for feed in due:
            feed._expire()  # may add the feed again
        if heap and self._timer is None:
            self._arm(loop, heap[0])


class SharedCheck:
    """The latest idle check of one session in this process, shared by all its feeds: the
    streams following a session ask whether it is still open once between them, not once
    each (an idle stream's only work, so idle CPU scales with sessions, not streams)."""

    __slots__ = ("answer", "started")

    def __init__(self) -> None:
        self.answer: asyncio.Task[bool] | None = None
        self.started = 0.0

    async def ask(self, check: Callable[[], Awaitable[bool]], max_age_s: float) -> bool:
        loop = asyncio.get_running_loop()
        answer = self.answer
        if answer is None or (
            answer.done()
            and (
                answer.cancelled()
                or answer.exception() is not None
                or loop.time() - self.started > max_age_s
            )
        ):
            answer = loop.create_task(_checked(check))
            answer.add_done_callback(_retrieved)
            self.answer, self.started = answer, loop.time()
        # Shielded: a stream that goes away while waiting leaves the check to the others.
        return await asyncio.shield(answer)


async def _checked(check: Callable[[], Awaitable[bool]]) -> bool:
    return await check()


def _retrieved(task: asyncio.Task[bool]) -> None:
    """Its failure reaches the streams that wait for it; none may wait any more."""
    if not task.cancelled():
        task.exception()


class Feed:
    """Live events of one session for one client stream (domain.ports.events.Feed).

    Small, because every open stream holds one (idle streams are the common case): a list
    rather than a deque, no asyncio.Event (a bare future while the stream waits), no timeout
    object per wait and no timer of its own. The ``within_s`` of ``wait`` is kept by the
    fanout's Deadlines, lazily: a wait only records its deadline, and the feed, when its slot
    comes early (the stream was busy meanwhile), is placed again for the latest deadline. A
    stream that receives an event per wait thus costs no timer work per event.
    """

    __slots__ = (
        "_capacity",
        "_deadline",
        "_deadlines",
        "_events",
        "_shared",
        "_slot",
        "_waiter",
        "closed",
        "key",
        "lagging",
        "recheck",
    )

    def __init__(self, key: tuple[str, str], capacity: int = DEFAULT_FEED_CAPACITY) -> None:
        self.key = key
        self._capacity = capacity
        self._events: list[SessionEvent] = []
        # The stream's wait, while it waits.
        self._waiter: asyncio.Future[None] | None = None
        # The current wait's deadline (loop time), and the slot of ``_deadlines`` the feed is
        # in (0: none; in one at most at a time); the fanout's, or one of its own outside one.
        self._deadline = 0.0
        self._slot = 0
        self._deadlines: Deadlines | None = None
        # The idle check shared with the other feeds of the session (LocalFanout.add).
        self._shared: SharedCheck | None = None
        # Events were dropped (full feed, or the reader reconnected): catch up from the log.
        self.lagging = False
        # The session was closed: the stream should end once it has caught up.
        self.closed = False
        # The backend lost its data: the stream should check its session (and job) still
        # exist (server.data_loss).
        self.recheck = False

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def put(self, event: SessionEvent) -> None:
        events = self._events
        if len(events) >= self._capacity:
            events.clear()
            self.lagging = True
        else:
            events.append(event)
        self._wake()

    def mark_lagging(self) -> None:
        self.lagging = True
        self._wake()

    def clear_lagging(self) -> None:
        self.lagging = False

    def mark_closed(self) -> None:
        self.closed = True
        self._wake()

    def mark_recheck(self) -> None:
        """Re-read the log and check the session still exists (its data may be gone)."""
        self.recheck = True
        self.lagging = True
        self._wake()

    def clear_recheck(self) -> None:
        self.recheck = False

    def _ready(self) -> bool:
        return bool(self._events) or self.lagging or self.closed or self.recheck

    async def wait(self, within_s: float | None = None) -> bool:
        """Wait until something is available (events, lag or close); False when nothing came
        within ``within_s`` seconds."""
        if self._events or self.lagging or self.closed or self.recheck:
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        if within_s is None:
            self._deadline = math.inf
        else:
            self._deadline = loop.time() + within_s
            if not self._slot:
                deadlines = self._deadlines
                if deadlines is None:
                    deadlines = self._deadlines = Deadlines()
                self._slot = deadlines.add(loop, self, self._deadline)
        try:
            await waiter
        finally:
            self._waiter = None
        return self._ready()

    def _expire(self) -> None:
        """Its deadline slot came: placed again for a later deadline, or ends the wait it was
        placed for."""
        self._slot = 0
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # no wait pending: the next one places the feed again
        loop = waiter.get_loop()
        if self._deadline == math.inf:
            return  # this wait has no deadline
        if self._deadline - loop.time() > 0.001:
            deadlines = self._deadlines
            if deadlines is not None:
                self._slot = deadlines.add(loop, self, self._deadline)
                return
        waiter.set_result(None)  # nothing came in time: wait() reports False

    async def shared_check(self, check: Callable[[], Awaitable[bool]], max_age_s: float) -> bool:
        """``check()``'s answer, or the one another stream of the same session in this
        process got at most ``max_age_s`` ago (or is getting now)."""
        shared = self._shared
        if shared is None:
            return await check()
        return await shared.ask(check, max_age_s)

    def discard(self) -> None:
        """The stream stopped following: leave the deadline slot (it would keep the feed
        alive)."""
        slot, self._slot = self._slot, 0
        if slot and self._deadlines is not None:
            self._deadlines.remove(self, slot)

    def drain(self) -> list[SessionEvent]:
        """Take every buffered event."""
        events = self._events
        self._events = []
        return events


class LocalFanout:
    """Which feeds follow which (tenant, session) in this process."""

    def __init__(self) -> None:
        self._feeds: dict[tuple[str, str], set[Feed]] = {}
        self._checks: dict[tuple[str, str], SharedCheck] = {}
        self._deadlines = Deadlines()

    def add(self, feed: Feed) -> bool:
        """Register a feed; True when it is the first for its session."""
        feeds = self._feeds.setdefault(feed.key, set())
        feeds.add(feed)
        shared = self._checks.get(feed.key)
        if shared is None:
            shared = self._checks[feed.key] = SharedCheck()
        feed._shared = shared
        if not feed._slot:
            feed._deadlines = self._deadlines
        return len(feeds) == 1

    def remove(self, feed: Feed) -> bool:
        """Unregister a feed; True when it was the last for its session."""
        feeds = self._feeds.get(feed.key)
        if feeds is None:
            return False
        feeds.discard(feed)
        feed.discard()
        if feeds:
            return False
        del self._feeds[feed.key]
        self._checks.pop(feed.key, None)
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

    def mark_session_lagging(self, key: tuple[str, str]) -> None:
        """Every stream of the session re-reads the log (its events may have been missed)."""
        for feed in self._feeds.get(key, ()):
            feed.mark_lagging()

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

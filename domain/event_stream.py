"""Following a session's events without gaps or duplicates.

A follower subscribes first, then reads the retained log after its cursor, then takes live
events from its feed. Anything the feed may have dropped (a slow client, a reconnect of the
reader, a sequence gap) is re-read from the log, so every event after the cursor is yielded
exactly once and in order.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field
from functools import partial

from domain.errors import Unavailable
from domain.jobs import EventKind, SessionEvent
from domain.outages import OutageWait
from domain.ports.events import EventLog, Feed

CATCH_UP_PAGE = 500
# An open stream re-reading the log waits out a backend outage (Redis restarting) this long,
# reading again every OUTAGE_RETRY_S; a longer one ends the stream UNAVAILABLE.
OUTAGE_WAITED_OUT_S = 30.0
OUTAGE_RETRY_S = 0.5


def history_truncated(session_id: str, requested_after: int, oldest: int) -> SessionEvent:
    """The event that tells a follower events between its cursor and ``oldest`` are gone."""
    return SessionEvent(
        session_id=session_id,
        job_id="",
        sequence=oldest - 1,
        time_ms=time.time_ns() // 1_000_000,
        kind=EventKind.HISTORY_TRUNCATED,
        data={"requested_after": requested_after, "oldest_retained": oldest},
    )


@dataclass(eq=False, slots=True)
class SessionFollower:
    """Yields the events of one session after a cursor, for one client stream.

    ``still_open`` is asked when no event arrived for ``idle_check_s``, when the feed asks for a
    recheck (the backend lost its data, or a cluster failed over) and when the log's last
    sequence went below the cursor (its data is gone); the stream ends when it returns False
    (the session expired or vanished). It also ends after the feed reports the session closed.
    """

    log: EventLog
    feed: Feed
    tenant_id: str
    session_id: str
    _: KW_ONLY
    still_open: Callable[[], Awaitable[bool]] | None = None
    # Asked on a recheck after ``still_open`` (a job's stream: does the job still exist; a
    # cluster failover may lose a job its session outlives); never shared between streams.
    still_there: Callable[[], Awaitable[bool]] | None = None
    idle_check_s: float = 30.0
    # The cursor: the sequence of the last event yielded.
    last: int = field(init=False, default=0)
    # The log's counter went below the cursor: the session's data may be gone.
    _log_reset: bool = field(init=False, default=False)

    async def _catch_up(self, *, report_truncation: bool) -> AsyncIterator[SessionEvent]:
        """Yield retained events after ``self.last`` until the log has no more."""
        first_page = True
        while True:
            page = await self.log.read_after(
                self.tenant_id, self.session_id, self.last, limit=CATCH_UP_PAGE
            )
            if first_page and report_truncation and self.last > 0:
                oldest = page.oldest_retained
                if oldest is None and page.last_sequence > self.last:
                    oldest = page.last_sequence + 1
                if oldest is not None and oldest > self.last + 1:
                    yield history_truncated(self.session_id, self.last, oldest)
            first_page = False
            if page.last_sequence < self.last:
                self._log_reset = True
            for event in page.events:
                if event.sequence > self.last:
                    self.last = event.sequence
                    yield event
            if len(page.events) < CATCH_UP_PAGE:
                return

    async def _catch_up_again(self) -> AsyncIterator[SessionEvent]:
        """``_catch_up`` for a stream already open. The feed asks for it after the reader
        reconnected, and Redis may go down again before the read: the stream then reads again
        from its cursor until the backend answers, for up to OUTAGE_WAITED_OUT_S, so a
        restart does not end a stream the reader itself rides out."""
        outage = OutageWait(f"stream of session {self.session_id} (re-reading its log)")
        while True:
            try:
                async for event in self._catch_up(report_truncation=True):
                    yield event
                return
            except Unavailable as exc:
                await outage.wait(exc, limit_s=OUTAGE_WAITED_OUT_S, retry_s=OUTAGE_RETRY_S)

    async def _answer(self, check: Callable[[], Awaitable[bool]]) -> bool:
        """``check()`` for a stream already open, asked again through a backend outage for up
        to OUTAGE_WAITED_OUT_S: the recheck after the reader reconnected, or an idle check,
        may meet Redis down (again), and the stream rides that out as its reads do."""
        outage = OutageWait(f"stream of session {self.session_id} (checking it is still open)")
        while True:
            try:
                return await check()
            except Unavailable as exc:
                await outage.wait(exc, limit_s=OUTAGE_WAITED_OUT_S, retry_s=OUTAGE_RETRY_S)

    async def events(self, after: int, *, catch_up: bool = True) -> AsyncIterator[SessionEvent]:
        """Events after ``after``. ``catch_up=False`` skips the first read of the log, for a
        caller whose feed was in effect before the event ``after`` was appended."""
        self.last = max(after, 0)
        feed = self.feed
        if catch_up:
            async for event in self._catch_up(report_truncation=True):
                yield event
        while True:
            if feed.recheck or self._log_reset:
                feed.clear_recheck()
                self._log_reset = False
                if self.still_open is not None and not await self._answer(self.still_open):
                    return
                if self.still_there is not None and not await self._answer(self.still_there):
                    return
            if not await feed.wait(self.idle_check_s):
                # Idle: the answer is shared by the streams of the session in this process
                # (at most half an idle period old), so idle streams cost per session.
                still_open = self.still_open
                if still_open is not None and not await feed.shared_check(
                    partial(self._answer, still_open), self.idle_check_s / 2
                ):
                    return
                continue
            if feed.lagging:
                feed.clear_lagging()
                feed.drain()
                async for event in self._catch_up_again():
                    yield event
            for event in feed.drain():
                if event.sequence <= self.last:
                    continue
                if event.sequence > self.last + 1:  # something was missed: re-read the log
                    async for missed in self._catch_up_again():
                        yield missed
                    continue
                self.last = event.sequence
                yield event
            if feed.closed and not feed.lagging:
                async for event in self._catch_up_again():
                    yield event
                return

"""SessionFollower over the in-memory log: a follower whose feed overflowed (a slow client) or
saw a gap catches up from the log, in order, exactly once; delivery never waits for it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import cast

import pytest

from domain import event_stream
from domain.errors import Unavailable
from domain.event_stream import SessionFollower
from domain.jobs import EventDraft, EventKind, EventPage, SessionEvent
from registry.memory_jobs import MemoryEventLog

TENANT, SESSION = "acme", "s-1"


def append(log: MemoryEventLog, n: int) -> None:
    log.append(TENANT, SESSION, EventDraft("job", EventKind.DELTA, "", {"text": str(n)}))


async def collect(follower: SessionFollower, after: int, count: int) -> list[int]:
    seen: list[int] = []
    async for event in follower.events(after):
        seen.append(event.sequence)
        if len(seen) == count:
            break
    return seen


async def test_an_overflowed_feed_catches_up_from_the_log() -> None:
    log = MemoryEventLog(max_events=5000, ttl_ms=60_000)
    async with log.subscribe(TENANT, SESSION) as slow, log.subscribe(TENANT, SESSION) as fast:
        for n in range(1, 1001):  # the reader delivers 1,000 events; nobody has read yet
            append(log, n)
        assert slow.lagging and fast.lagging  # both feeds (256 events) overflowed
        follower = SessionFollower(log, slow, TENANT, SESSION)
        assert await collect(follower, 0, 1000) == list(range(1, 1001))


async def test_a_lagging_follower_gets_later_live_events_once() -> None:
    log = MemoryEventLog(max_events=5000, ttl_ms=60_000)
    async with log.subscribe(TENANT, SESSION) as feed:
        follower = SessionFollower(log, feed, TENANT, SESSION)
        for n in range(1, 301):
            append(log, n)
        task = asyncio.create_task(collect(follower, 0, 310))
        await asyncio.sleep(0)  # let it catch up, then send live events
        for n in range(301, 311):
            append(log, n)
        assert await asyncio.wait_for(task, 5) == list(range(1, 311))


async def test_a_trimmed_log_reports_history_truncated_first() -> None:
    log = MemoryEventLog(max_events=10, ttl_ms=60_000)
    for n in range(1, 31):
        append(log, n)
    async with log.subscribe(TENANT, SESSION) as feed:
        follower = SessionFollower(log, feed, TENANT, SESSION)
        events = []
        async for event in follower.events(5):
            events.append(event)
            if len(events) == 11:
                break
    assert events[0].kind is EventKind.HISTORY_TRUNCATED
    assert dict(events[0].data) == {"requested_after": 5, "oldest_retained": 21}
    assert [e.sequence for e in events[1:]] == list(range(21, 31))


async def test_idle_followers_of_a_session_end_once_it_is_no_longer_open() -> None:
    log = MemoryEventLog(max_events=5000, ttl_ms=60_000)
    asked = 0

    async def closed() -> bool:
        nonlocal asked
        asked += 1
        return False

    async with log.subscribe(TENANT, SESSION) as one, log.subscribe(TENANT, SESSION) as two:
        followers = [
            SessionFollower(log, feed, TENANT, SESSION, still_open=closed, idle_check_s=0.05)
            for feed in (one, two)
        ]
        ended = await asyncio.wait_for(
            asyncio.gather(*(collect(follower, 0, 1) for follower in followers)), 5
        )
    assert ended == [[], []]
    assert asked >= 1


class FlakyLog(MemoryEventLog):
    """The memory log, whose next ``outages`` reads fail as Redis does while it restarts."""

    outages = 0

    async def read_after(
        self, tenant_id: str, session_id: str, after: int, *, limit: int
    ) -> EventPage:
        if self.outages:
            self.outages -= 1
            raise Unavailable("redis unavailable: connection refused")
        return await super().read_after(tenant_id, session_id, after, limit=limit)


async def test_an_open_stream_waits_out_an_outage_met_while_catching_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(event_stream, "OUTAGE_RETRY_S", 0.01)
    log = FlakyLog(max_events=5000, ttl_ms=60_000)
    async with log.subscribe(TENANT, SESSION) as feed:
        follower = SessionFollower(log, feed, TENANT, SESSION)
        events = cast(AsyncGenerator[SessionEvent, None], follower.events(0))
        append(log, 1)
        assert (await anext(events)).sequence == 1
        # The reader reconnected (the feed must re-read the log) and Redis went down again.
        append(log, 2)
        feed.drain()
        log.outages = 3
        feed.mark_lagging()
        assert (await asyncio.wait_for(anext(events), 5)).sequence == 2
        assert log.outages == 0
        await events.aclose()


async def test_an_outage_longer_than_the_bound_ends_the_stream_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(event_stream, "OUTAGE_RETRY_S", 0.01)
    monkeypatch.setattr(event_stream, "OUTAGE_WAITED_OUT_S", 0.05)
    log = FlakyLog(max_events=5000, ttl_ms=60_000)
    async with log.subscribe(TENANT, SESSION) as feed:
        follower = SessionFollower(log, feed, TENANT, SESSION)
        events = follower.events(0)
        append(log, 1)
        assert (await anext(events)).sequence == 1
        log.outages = 1_000_000
        feed.mark_lagging()
        with pytest.raises(Unavailable):
            await asyncio.wait_for(anext(events), 5)


class FlakyCheck:
    """A ``still_open`` check whose next ``outages`` calls fail as Redis does while it restarts."""

    def __init__(self, outages: int) -> None:
        self.outages = outages
        self.asked = 0
        self.answered = asyncio.Event()

    async def __call__(self) -> bool:
        self.asked += 1
        if self.outages:
            self.outages -= 1
            raise Unavailable("redis unavailable: connection refused")
        self.answered.set()
        return True


async def test_a_recheck_that_meets_an_outage_is_asked_again_and_the_stream_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(event_stream, "OUTAGE_RETRY_S", 0.01)
    log = MemoryEventLog(max_events=5000, ttl_ms=60_000)
    check = FlakyCheck(outages=3)
    async with log.subscribe(TENANT, SESSION) as feed:
        follower = SessionFollower(log, feed, TENANT, SESSION, still_open=check)
        events = cast(AsyncGenerator[SessionEvent, None], follower.events(0))
        append(log, 1)
        assert (await anext(events)).sequence == 1
        # Redis lost its data (the feed asks for a recheck), and is down again for the check.
        feed.mark_recheck()
        append(log, 2)
        assert (await asyncio.wait_for(anext(events), 5)).sequence == 2
        assert (check.outages, check.asked) == (0, 4)
        await events.aclose()


async def test_an_idle_check_that_meets_an_outage_is_asked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(event_stream, "OUTAGE_RETRY_S", 0.01)
    log = MemoryEventLog(max_events=5000, ttl_ms=60_000)
    check = FlakyCheck(outages=2)
    async with log.subscribe(TENANT, SESSION) as feed:
        follower = SessionFollower(log, feed, TENANT, SESSION, still_open=check, idle_check_s=0.02)
        events = cast(AsyncGenerator[SessionEvent, None], follower.events(0))
        append(log, 1)
        assert (await anext(events)).sequence == 1
        later = asyncio.ensure_future(anext(events))
        await asyncio.wait_for(check.answered.wait(), 5)  # failed twice, then answered
        assert check.asked == 3
        assert not later.done()
        append(log, 2)
        assert (await asyncio.wait_for(later, 5)).sequence == 2
        await events.aclose()


async def test_a_recheck_outage_longer_than_the_bound_ends_the_stream_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(event_stream, "OUTAGE_RETRY_S", 0.01)
    monkeypatch.setattr(event_stream, "OUTAGE_WAITED_OUT_S", 0.05)
    log = MemoryEventLog(max_events=5000, ttl_ms=60_000)
    check = FlakyCheck(outages=1_000_000)
    async with log.subscribe(TENANT, SESSION) as feed:
        follower = SessionFollower(log, feed, TENANT, SESSION, still_open=check)
        events = follower.events(0)
        append(log, 1)
        assert (await anext(events)).sequence == 1
        feed.mark_recheck()
        with pytest.raises(Unavailable):
            await asyncio.wait_for(anext(events), 5)

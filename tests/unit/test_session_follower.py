"""SessionFollower over the in-memory log: a follower whose feed overflowed (a slow client) or
saw a gap catches up from the log, in order, exactly once; delivery never waits for it."""

from __future__ import annotations

import asyncio

from domain.event_stream import SessionFollower
from domain.jobs import EventDraft, EventKind
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

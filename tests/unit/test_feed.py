"""registry.fanout.Feed's wait: woken by what arrives, False once its own deadline passed with
nothing, whatever deadline an earlier wait had (one timer per feed, moved lazily)."""

from __future__ import annotations

import asyncio

import pytest

from domain.jobs import EventKind, SessionEvent
from registry.fanout import Feed, LocalFanout

KEY = ("acme", "s-1")


def event(sequence: int) -> SessionEvent:
    return SessionEvent(
        session_id=KEY[1], job_id="job", sequence=sequence, time_ms=0, kind=EventKind.DELTA
    )


async def test_a_wait_with_nothing_arriving_reports_false_after_its_time() -> None:
    feed = Feed(KEY)
    assert await asyncio.wait_for(feed.wait(0.02), 5) is False


async def test_a_wait_is_woken_by_an_event() -> None:
    feed = Feed(KEY)
    waiting = asyncio.create_task(feed.wait(30))
    await asyncio.sleep(0)
    feed.put(event(1))
    assert await asyncio.wait_for(waiting, 5) is True
    assert len(feed.drain()) == 1


async def test_a_later_wait_outlives_the_deadline_of_an_earlier_one() -> None:
    feed = Feed(KEY)
    first = asyncio.create_task(feed.wait(0.02))
    await asyncio.sleep(0)
    feed.put(event(1))
    assert await first is True
    feed.drain()
    second = asyncio.create_task(feed.wait(30))
    # The first wait's timer fires meanwhile; the second wait goes on.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(second), 0.1)
    feed.mark_closed()
    assert await asyncio.wait_for(second, 5) is True


async def test_a_wait_without_a_deadline_is_not_ended_by_an_earlier_timer() -> None:
    feed = Feed(KEY)
    first = asyncio.create_task(feed.wait(0.02))
    await asyncio.sleep(0)
    feed.mark_lagging()
    assert await first is True
    feed.clear_lagging()
    second = asyncio.create_task(feed.wait(None))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(second), 0.1)
    feed.put(event(2))
    assert await asyncio.wait_for(second, 5) is True


async def test_a_full_feed_drops_what_it_holds_and_lags() -> None:
    feed = Feed(KEY, capacity=2)
    for n in range(3):
        feed.put(event(n))
    assert feed.lagging and feed.drain() == []


async def test_a_removed_feed_leaves_the_deadlines() -> None:
    fanout, feed = LocalFanout(), Feed(KEY)
    fanout.add(feed)
    waiting = asyncio.create_task(feed.wait(30))
    await asyncio.sleep(0)
    feed.put(event(1))
    await waiting
    assert fanout._deadlines.held() == 1  # the wait's deadline is still kept
    fanout.remove(feed)
    assert fanout._deadlines.held() == 0


async def test_the_feeds_of_a_fanout_share_one_deadline_timer() -> None:
    fanout = LocalFanout()
    feeds = following(fanout, 3)
    waits = [asyncio.create_task(feed.wait(0.05)) for feed in feeds]
    assert await asyncio.gather(*waits) == [False, False, False]
    assert all(feed._deadlines is fanout._deadlines for feed in feeds)


async def test_a_busy_feed_still_times_out_after_its_latest_wait() -> None:
    fanout, feed = LocalFanout(), Feed(KEY)
    fanout.add(feed)
    loop = asyncio.get_running_loop()
    waiting = asyncio.create_task(feed.wait(0.05))
    await asyncio.sleep(0.03)
    feed.put(event(1))
    assert await waiting is True
    feed.drain()
    started = loop.time()
    assert await feed.wait(0.1) is False
    assert loop.time() - started >= 0.099


class Checks:
    """A still-open check that counts its calls and answers ``open``."""

    def __init__(self, *, fail: bool = False) -> None:
        self.calls = 0
        self.open = True
        self.fail = fail

    async def __call__(self) -> bool:
        self.calls += 1
        await asyncio.sleep(0)
        if self.fail:
            raise ConnectionError("store away")
        return self.open


def following(fanout: LocalFanout, count: int) -> list[Feed]:
    feeds = [Feed(KEY) for _ in range(count)]
    for feed in feeds:
        fanout.add(feed)
    return feeds


async def test_the_streams_of_a_session_share_one_idle_check() -> None:
    checks, feeds = Checks(), following(LocalFanout(), 10)
    answers = await asyncio.gather(*(feed.shared_check(checks, 30) for feed in feeds))
    assert answers == [True] * 10 and checks.calls == 1
    assert await feeds[3].shared_check(checks, 30) is True and checks.calls == 1


async def test_an_idle_check_older_than_its_age_is_asked_again() -> None:
    checks, feeds = Checks(), following(LocalFanout(), 2)
    assert await feeds[0].shared_check(checks, 0.0) is True
    checks.open = False
    await asyncio.sleep(0.01)
    assert await feeds[1].shared_check(checks, 0.0) is False and checks.calls == 2


async def test_a_failed_idle_check_reaches_its_callers_and_is_not_reused() -> None:
    checks, feeds = Checks(fail=True), following(LocalFanout(), 2)
    with pytest.raises(ConnectionError):
        await feeds[0].shared_check(checks, 30)
    checks.fail = False
    assert await feeds[1].shared_check(checks, 30) is True and checks.calls == 2


async def test_sessions_do_not_share_idle_checks() -> None:
    fanout, checks = LocalFanout(), Checks()
    first, other = Feed(KEY), Feed(("acme", "s-2"))
    fanout.add(first)
    fanout.add(other)
    await first.shared_check(checks, 30)
    await other.shared_check(checks, 30)
    assert checks.calls == 2


async def test_a_feed_placed_again_does_not_delay_an_earlier_deadline() -> None:
    fanout = LocalFanout()
    busy, idle = following(fanout, 2)
    loop = asyncio.get_running_loop()
    first = asyncio.create_task(busy.wait(0.05))
    await asyncio.sleep(0.01)
    busy.put(event(1))
    assert await first is True
    busy.drain()
    later = asyncio.create_task(busy.wait(5))  # placed again when its first slot comes
    started = loop.time()
    assert await idle.wait(0.1) is False
    assert loop.time() - started < 1
    later.cancel()

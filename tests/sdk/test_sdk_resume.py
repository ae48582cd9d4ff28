"""Streams that resume by themselves: a dropped connection mid-stream (both backends), a
server process killed and restarted mid-stream (Redis), and a truncated history raised or
yielded as the caller chooses."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from aorkestra import AsyncClient, HistoryTruncatedError, RetryNotice, RetryPolicy, events
from domain.identity import Role
from tests.sdk.collect import Collector
from tests.sdk.conftest import Platform, start_platform
from tests.support.keys import api_key_for
from tests.support.tcp_proxy import DroppingProxy

FAST = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.5)


@pytest.fixture
async def slow_platform(backend_url: str | None) -> AsyncIterator[Platform]:
    """Jobs that take a while between events, so a connection can drop mid-job."""
    async with start_platform(backend_url, step_delay_s=0.2) as started:
        yield started


async def test_follow_survives_dropped_connections_with_no_loss_and_no_duplicate(
    slow_platform: Platform,
) -> None:
    proxy = DroppingProxy(slow_platform.address)
    address = await proxy.start()
    retries: list[RetryNotice] = []
    try:
        async with (
            slow_platform.client() as direct,
            AsyncClient(
                address,
                api_key=api_key_for("acme", Role.CLIENT),
                retry=FAST,
                on_retry=retries.append,
            ) as through_proxy,
        ):
            session = await direct.sessions.create("support-bot")
            count = 0

            def drop_mid_job(event: events.Event) -> None:
                nonlocal count
                count += 1
                if count in (2, 4):  # mid-job, twice
                    proxy.drop_all()

            follower = Collector(through_proxy.sessions.follow(session.session_id), drop_mid_job)
            first_job = [e async for e in direct.chat.send(session.session_id, "first")]
            second = [e async for e in direct.chat.send(session.session_id, "second")]
            followed = await follower.until(second[-1].sequence, 30)
    finally:
        await proxy.stop()

    everything = [*first_job, *second]
    assert [e.sequence for e in followed] == [e.sequence for e in everything]
    assert [e.kind for e in followed] == [e.kind for e in everything]
    assert retries, "the drops did not make the stream reconnect"
    assert proxy.connections > 1


async def test_send_resumes_its_job_after_a_dropped_connection(slow_platform: Platform) -> None:
    proxy = DroppingProxy(slow_platform.address)
    address = await proxy.start()
    try:
        async with AsyncClient(
            address, api_key=api_key_for("acme", Role.CLIENT), retry=FAST
        ) as sdk:
            session = await sdk.sessions.create("support-bot")
            seen: list[events.Event] = []
            async for event in sdk.chat.send(session.session_id, "keep going"):
                seen.append(event)
                if len(seen) == 2:
                    proxy.drop_all()
    finally:
        await proxy.stop()

    async with slow_platform.client() as direct:
        log: list[events.Event] = []
        async for event in direct.sessions.follow(session.session_id):
            log.append(event)
            if event.final:
                break
    assert [e.sequence for e in seen] == [e.sequence for e in log]
    assert isinstance(seen[-1], events.Completed)


@pytest.fixture
async def short_log_platform(backend_url: str | None) -> AsyncIterator[Platform]:
    async with start_platform(backend_url, event_log_max_events=3) as started:
        yield started


async def test_a_truncated_history_raises_by_default(short_log_platform: Platform) -> None:
    async with short_log_platform.client() as sdk:
        session = await sdk.sessions.create("support-bot")
        await sdk.chat.reply(session.session_id, "fill the log")
        with pytest.raises(HistoryTruncatedError) as caught:
            async for _ in sdk.sessions.follow(session.session_id, after=1):
                pass
    assert caught.value.requested_after == 1
    assert caught.value.oldest_retained > 2


async def test_a_truncated_history_is_yielded_when_asked_and_the_stream_goes_on(
    short_log_platform: Platform,
) -> None:
    async with short_log_platform.client() as sdk:
        session = await sdk.sessions.create("support-bot")
        sent = [e async for e in sdk.chat.send(session.session_id, "fill the log")]
        seen: list[events.Event] = []
        async for event in sdk.sessions.follow(session.session_id, after=1, on_truncated="yield"):
            seen.append(event)
            if event.sequence == sent[-1].sequence:
                break
    assert isinstance(seen[0], events.HistoryTruncated)
    assert [e.sequence for e in seen[1:]] == list(
        range(seen[0].oldest_retained, sent[-1].sequence + 1)
    )

"""The Redis event log's subscription bookkeeping stays as large as the set of followed
sessions: subscriptions tried while Redis was away leave nothing behind once it is back, and a
session's subscription outlives its last stream only for the linger time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from domain.errors import Unavailable
from domain.ids import new_id
from registry.keys import KeySpace
from registry.redis_client import create_redis
from registry.redis_events import RedisEventLog
from tests.support.redis_process import RedisProcess

TENANT = "acme"


@pytest.fixture
async def events(own_redis: RedisProcess) -> AsyncIterator[RedisEventLog]:
    redis = create_redis(own_redis.url, socket_timeout_s=0.5, connect_timeout_s=0.2)
    subscriber = create_redis(own_redis.url, socket_timeout_s=1.0, connect_timeout_s=0.2)
    log = RedisEventLog(
        redis, subscriber, KeySpace("test"), read_block_s=0.2, subscribe_timeout_s=0.3
    )
    yield log
    await log.aclose()
    await redis.aclose()


async def test_subscriptions_tried_while_redis_was_away_are_forgotten_when_it_returns(
    events: RedisEventLog, own_redis: RedisProcess
) -> None:
    session_id = new_id()
    async with events.subscribe(TENANT, session_id) as followed:
        own_redis.stop()
        for _ in range(5):
            with pytest.raises(Unavailable):
                async with events.subscribe(TENANT, new_id()):
                    pass
        own_redis.start()
        # The reader resubscribes what is followed, then marks every feed lagging.
        while not followed.lagging:
            assert await asyncio.wait_for(followed.wait(), 10)
        # A second follower of the session waits for that resubscription to be confirmed.
        async with events.subscribe(TENANT, session_id):
            assert events.awaiting_confirmation == 0


async def test_leaving_a_session_whose_connection_closed_under_it_is_quiet(
    own_redis: RedisProcess, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis = create_redis(own_redis.url, socket_timeout_s=0.5, connect_timeout_s=0.2)
    # No lingering: leaving the session unsubscribes at once.
    events = RedisEventLog(redis, redis, KeySpace("test"), read_block_s=0.2, linger_s=0)
    unsubscribed = asyncio.Event()
    try:
        async with events.subscribe(TENANT, new_id()):
            [reader] = events._readers.values()
            pubsub = reader.pubsub
            assert pubsub is not None

            async def closed_under_it(*channels: str) -> None:
                # What redis-py raises when the connection is closed while the command is sent.
                unsubscribed.set()
                raise AttributeError("'NoneType' object has no attribute 'writelines'")

            monkeypatch.setattr(pubsub, "sunsubscribe", closed_under_it)
    finally:
        await events.aclose()
        await redis.aclose()
    assert unsubscribed.is_set()
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


async def subscribers(redis_url: str, channel: str) -> int:
    client = create_redis(redis_url, socket_timeout_s=1.0, connect_timeout_s=0.2)
    try:
        [(_, count)] = await client.pubsub_shardnumsub(channel)
        return int(count)
    finally:
        await client.aclose()


async def test_a_sessions_subscription_is_dropped_when_its_linger_time_is_up(
    own_redis: RedisProcess,
) -> None:
    redis = create_redis(own_redis.url, socket_timeout_s=0.5, connect_timeout_s=0.2)
    subscriber = create_redis(own_redis.url, socket_timeout_s=1.0, connect_timeout_s=0.2)
    keys = KeySpace("test")
    events = RedisEventLog(redis, subscriber, keys, read_block_s=0.2, linger_s=0.05)
    try:
        session_id = new_id()
        channel = keys.session_channel(TENANT, session_id)
        async with events.subscribe(TENANT, session_id):
            assert await subscribers(own_redis.url, channel) == 1
        assert events.lingering == 1
        await events.lingering_dropped()
        assert await subscribers(own_redis.url, channel) == 0
    finally:
        await events.aclose()
        await redis.aclose()


async def test_a_session_followed_again_while_its_subscription_lingers_keeps_it(
    events: RedisEventLog, own_redis: RedisProcess
) -> None:
    session_id = new_id()
    channel = events._keys.session_channel(TENANT, session_id)
    async with events.subscribe(TENANT, session_id):
        pass
    async with events.subscribe(TENANT, session_id):
        assert events.lingering == 0
        assert await subscribers(own_redis.url, channel) == 1

"""A command to Redis is written in the task that sends it, still bounded by the socket
timeout (registry.redis_client: no task per round trip)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any

import pytest
from redis import exceptions as redis_errors
from redis.asyncio.connection import Connection

from registry.redis_client import create_redis
from tests.support.redis_process import RedisProcess


async def test_a_command_makes_no_task_of_its_own(redis_url: str) -> None:
    client = create_redis(redis_url, socket_timeout_s=5.0, connect_timeout_s=1.0)
    try:
        await client.ping()  # connected before counting
        loop = asyncio.get_running_loop()
        made: list[object] = []
        previous = loop.get_task_factory()

        def counting(
            loop: asyncio.AbstractEventLoop,
            coro: Generator[Any, None, Any] | Coroutine[Any, Any, Any],
            **kwargs: Any,
        ) -> asyncio.Future[Any]:
            made.append(coro)
            return asyncio.Task(coro, loop=loop, **kwargs)

        loop.set_task_factory(counting)
        try:
            await client.set("k", "v")
            assert await client.get("k") == "v"
        finally:
            loop.set_task_factory(previous)
        assert made == []
    finally:
        await client.aclose()


async def test_a_write_redis_does_not_read_times_out_and_the_next_command_works(
    own_redis: RedisProcess,
) -> None:
    client = create_redis(own_redis.url, socket_timeout_s=0.5, connect_timeout_s=0.5, retries=0)
    try:
        await client.ping()
        own_redis.pause()
        # Far more than the socket buffers hold: the write waits for a reader that is stopped.
        with pytest.raises(redis_errors.TimeoutError, match="Timeout writing to socket"):
            await asyncio.wait_for(client.set("big", "x" * 64_000_000), 10)
        own_redis.resume()
        assert await client.set("small", "1")
        assert await client.get("small") == "1"
    finally:
        await client.aclose()


def test_commands_are_packed_byte_for_byte_as_redis_py_packs_them() -> None:
    """hiredis' packing (the common shapes) and redis-py's (the others) agree."""
    client = create_redis("redis://127.0.0.1:1/0", socket_timeout_s=5.0, connect_timeout_s=1.0)
    ours = client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
    theirs = Connection()
    shapes: list[tuple[Any, ...]] = [
        ("GET", "k"),
        ("SET", "k", b"v\r\n\x00"),
        ("EVALSHA", "f" * 40, 2, "ao:{t}:a", "ao:{t}:b", "é", 0, -7, 2**70, "", '{"d": 1}'),
        ("CONFIG GET", "maxmemory"),  # a command named with a space
        ("ZADD", "z", 1.5, "m"),  # a float
        ("SET", "k", "x" * 10_000),  # a long argument
        ("SET", "ключ", "значение"),
        ("HSET", "h", *[f"f{n}" for n in range(600)]),  # an enqueue of 100 items has 600
        ("SET", "k", memoryview(b"v")),
    ]
    for args in shapes:  # the same bytes on the wire (redis-py splits long ones in buffers)
        assert b"".join(ours.pack_command(*args)) == b"".join(theirs.pack_command(*args)), args
    with pytest.raises(redis_errors.DataError):
        ours.pack_command("SET", "k", True)


class _CountingCondition(asyncio.Condition):
    acquired = 0

    async def __aenter__(self) -> None:
        self.acquired += 1
        await super().__aenter__()


async def test_a_command_on_an_idle_connection_takes_no_pool_lock(redis_url: str) -> None:
    client = create_redis(redis_url, socket_timeout_s=5.0, connect_timeout_s=1.0)
    try:
        await client.ping()  # one connection, idle in the pool
        pool: Any = client.connection_pool
        pool._condition = condition = _CountingCondition()
        await client.set("k", "v")
        assert await client.get("k") == "v"
        assert condition.acquired == 0
    finally:
        await client.aclose()


async def test_a_task_waiting_for_a_connection_gets_the_next_one_freed(redis_url: str) -> None:
    client = create_redis(redis_url, socket_timeout_s=2.0, connect_timeout_s=1.0, max_connections=1)
    pool: Any = client.connection_pool
    try:
        held = await pool.get_connection()
        waiter = asyncio.create_task(pool.get_connection())
        await asyncio.sleep(0.05)  # the waiter waits on the pool (nothing to await on)
        await pool.release(held)
        newcomer = asyncio.create_task(pool.get_connection())
        assert await asyncio.wait_for(waiter, 2) is held  # first come, first served
        assert not newcomer.done()
        await pool.release(held)
        assert await asyncio.wait_for(newcomer, 2) is held
        await pool.release(held)
        held = await pool.get_connection()
        with pytest.raises(redis_errors.ConnectionError, match="No connection available"):
            await pool.get_connection()  # none freed within the pool's timeout
        await pool.release(held)
        assert await client.get("missing") is None
    finally:
        await client.aclose()


async def test_replies_and_pub_sub_messages_are_parsed_by_hiredis(redis_url: str) -> None:
    """The C parser is a dependency (issue 16): a missing or broken install would fall back to
    redis-py's Python parser silently, about 0.5 ms more CPU per chat."""
    client = create_redis(redis_url, socket_timeout_s=5.0, connect_timeout_s=1.0)
    try:
        assert await client.hset("h", mapping={"a": "1"}) == 1
        assert await client.hgetall("h") == {"a": "1"}  # a RESP3 map, decoded
        pubsub = client.pubsub()
        await pubsub.subscribe("ch")
        assert await client.publish("ch", "hello") == 1
        seen = [await pubsub.get_message(timeout=5.0) for _ in range(2)]
        assert [m["type"] for m in seen if m] == ["subscribe", "message"]
        assert seen[1] is not None and seen[1]["data"] == "hello"
        connection: Any = pubsub.connection  # typed None until subscribed
        assert type(connection._parser).__name__ == "_AsyncHiredisParser"
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()

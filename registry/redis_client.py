"""Creating Redis clients and turning connection failures into domain errors."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from domain.errors import Unavailable
from registry.keys import KeySpace
from registry.lua_scripts import ScriptRunner

RESP_PROTOCOL = 3


def create_redis(
    url: str,
    *,
    socket_timeout_s: float,
    connect_timeout_s: float,
    max_connections: int = 64,
    client_name: str = "agent-orchestrator",
    retries: int = 1,
    decode_responses: bool = True,
) -> Redis:
    """A pooled client speaking RESP3 with short timeouts, so a dead Redis fails calls fast
    (UNAVAILABLE) instead of hanging them. One quick retry covers a dropped idle connection.

    The pool blocks (up to the socket timeout) when all its connections are busy, so a burst of
    calls queues for a connection instead of failing with "too many connections".
    ``decode_responses`` False returns raw bytes (the work queue's payloads need no decoding)."""
    pool = BlockingConnectionPool.from_url(
        url,
        protocol=RESP_PROTOCOL,
        decode_responses=decode_responses,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        socket_keepalive=True,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=retries),
        max_connections=max_connections,
        timeout=socket_timeout_s,
        client_name=client_name,
    )
    return Redis.from_pool(pool)  # the client owns the pool and closes it


class RedisStore:
    """What every Redis store holds: the client, the key layout and the runner of the Lua
    scripts of its area, ``registry/lua/<SCRIPTS>/``."""

    SCRIPTS: ClassVar[str]

    def __init__(self, redis: Redis, keys: KeySpace) -> None:
        self._redis = redis
        self._keys = keys
        self._scripts = ScriptRunner(redis, self.SCRIPTS)


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    """Stop a store's background task (a pub/sub listener): cancel it and wait until it ends."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextmanager
def redis_errors_as_unavailable() -> Iterator[None]:
    """Map connection-level Redis failures to domain.errors.Unavailable."""
    try:
        yield
    except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
        raise Unavailable(f"redis unavailable: {exc}") from exc
    except redis_errors.BusyLoadingError as exc:  # pragma: no cover - subclass kept explicit
        raise Unavailable(f"redis is loading: {exc}") from exc


def as_str(value: Any) -> str:
    """A reply value as text, whether the client decodes responses or not."""
    return value.decode() if isinstance(value, bytes) else str(value)


def pairs_to_dict(flat: Any) -> dict[Any, Any]:
    """Lua returns HGETALL-like replies as a flat list; RESP3 commands return a dict. Accept
    both."""
    if isinstance(flat, dict):
        return flat
    return dict(zip(flat[::2], flat[1::2], strict=True))


def time_ms(reply: Any) -> int:
    """A TIME reply (seconds, microseconds) as milliseconds since the epoch."""
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) // 1000


async def due_members(redis: Redis, hints: str, *, limit: int) -> list[str]:
    """Up to ``limit`` members of ``hints`` (a sorted set scored by when to look at each member,
    ms) that are due by the Redis clock, earliest first."""
    now_ms = time_ms(await redis.time())
    due = await redis.zrangebyscore(hints, "-inf", now_ms, start=0, num=limit)
    return [as_str(member) for member in due]


async def newest_first(redis: Redis, index: str, *, before: str | None, count: int) -> list[str]:
    """Up to ``count`` members of ``index`` (a sorted set with all scores 0 whose ids sort by
    creation time) that come before ``before`` (all when None), newest first."""
    start = f"({before}" if before else "+"
    ids = await redis.execute_command(  # type: ignore[no-untyped-call]
        "ZRANGE", index, start, "-", "BYLEX", "REV", "LIMIT", 0, count
    )
    return [as_str(member) for member in ids]

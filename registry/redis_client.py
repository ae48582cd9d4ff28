"""Creating Redis clients and turning connection failures into domain errors."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from domain.errors import Unavailable
from domain.models import Page
from registry.keys import KeySpace
from registry.lua_scripts import ScriptRunner

RESP_PROTOCOL = 3

T = TypeVar("T")


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


async def page_newest_first(
    redis: Redis,
    index: str,
    *,
    after: str | None,
    limit: int,
    budget: int,
    load: Callable[[list[str]], Awaitable[Sequence[T | None]]],
    keep: Callable[[T], bool],
) -> Page[T]:
    """One page of the records listed in ``index`` (as in ``newest_first``), newest first,
    from the id after ``after``: ``load`` reads a chunk of ids' records (None for one Redis
    dropped after its retention: its id leaves the index too), ``keep`` filters them.

    At most ``budget`` ids are examined; when that is spent, the page holds what matched so
    far and its cursor lets the caller continue. ``next_cursor`` is None on the last page."""
    found: list[T] = []
    cursor = after
    examined = 0
    chunk = max(limit, 100)
    while examined < budget:
        ids = await newest_first(redis, index, before=cursor, count=chunk)
        if not ids:
            return Page(found, None)
        records = await load(ids)
        gone: list[str] = []
        for record_id, record in zip(ids, records, strict=True):
            examined += 1
            cursor = record_id
            if record is None:
                gone.append(record_id)
            elif keep(record):
                found.append(record)
                if len(found) == limit:
                    break
        if gone:
            await redis.zrem(index, *gone)
        if len(found) == limit:
            more = cursor != ids[-1] or len(ids) == chunk
            return Page(found, cursor if more else None)
        if len(ids) < chunk:
            return Page(found, None)
    return Page(found, cursor)

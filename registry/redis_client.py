"""Creating Redis clients and turning connection failures into domain errors."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar, cast

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode, ClusterPubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from domain.errors import Unavailable
from domain.models import Page
from registry.keys import KeySpace
from registry.lua_scripts import ScriptRunner
from registry.redis_url import RedisTarget, parse_redis_url

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
    ``decode_responses`` False returns raw bytes (the work queue's payloads need no decoding).

    A cluster URL (registry.redis_url) gives a ``RedisCluster`` instead, typed as ``Redis``:
    it offers the same command methods and non-transactional pipelines, the only ones the
    stores use (every key of a command or script in one slot: registry.keys)."""
    target = parse_redis_url(url)
    if target.cluster:
        return create_cluster(
            target,
            socket_timeout_s=socket_timeout_s,
            connect_timeout_s=connect_timeout_s,
            max_connections=max_connections,
            client_name=client_name,
            retries=retries,
            decode_responses=decode_responses,
        )
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


# A cluster client's connections are per node and do not queue for a free one (redis-py raises
# MaxConnectionsError, seen as UNAVAILABLE), so each node gets this many times the pool size.
CLUSTER_CONNECTIONS_FACTOR = 2


def create_cluster(
    target: RedisTarget,
    *,
    socket_timeout_s: float,
    connect_timeout_s: float,
    max_connections: int,
    client_name: str,
    retries: int,
    decode_responses: bool,
) -> Redis:
    """A ``RedisCluster`` on ``target``'s seed nodes, with the options of a single client.

    redis-py follows MOVED and ASK replies, refreshes the slot map when nodes change, and on a
    connection error or CLUSTERDOWN retries ``retries`` times (after re-reading the layout).
    Reads go to masters only (no stale reads from replicas). SCRIPT LOAD goes to every master,
    so ``ScriptRunner``'s NOSCRIPT reload works per node."""
    settings: dict[str, Any] = {
        "ssl": target.tls,
        "protocol": RESP_PROTOCOL,
        "decode_responses": decode_responses,
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": connect_timeout_s,
        "socket_keepalive": True,
        "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=retries),
        "max_connections": max_connections * CLUSTER_CONNECTIONS_FACTOR,
        "client_name": client_name,
    }
    # The URL's own options win, as they do for a single Redis (redis-py's from_url).
    settings.update(
        (name, value)
        for name, value in target.options.items()
        if name not in ("host", "port", "db", "connection_class")
    )
    cluster = _Cluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.seeds], **settings
    )
    return cast(Redis, cluster)


class _ClusterSubscriber(ClusterPubSub):
    """A cluster pub/sub that reads the cluster's layout before its first command (redis-py
    picks the node of the first channel's slot from a slot map it has not loaded yet when the
    client's first call is a SUBSCRIBE)."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        await self.cluster.initialize()  # a no-op once initialized
        return await super().execute_command(*args, **kwargs)


class _Cluster(RedisCluster):
    """``RedisCluster`` whose pub/sub works as a first call. Classic SUBSCRIBE on any node
    hears every PUBLISH of the cluster (messages are broadcast over the cluster bus)."""

    def pubsub(
        self,
        node: ClusterNode | None = None,
        host: str | None = None,
        port: int | None = None,
        **kwargs: Any,
    ) -> ClusterPubSub:
        return _ClusterSubscriber(self, node=node, host=host, port=port, **kwargs)


def is_cluster(redis: Redis) -> bool:
    """Whether ``redis`` is a cluster client (create_cluster)."""
    return isinstance(redis, RedisCluster)


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
    """Map connection-level Redis failures (and a cluster that is down for the moment) to
    domain.errors.Unavailable."""
    try:
        yield
    except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
        raise Unavailable(f"redis unavailable: {exc}") from exc
    except redis_errors.BusyLoadingError as exc:  # pragma: no cover - subclass kept explicit
        raise Unavailable(f"redis is loading: {exc}") from exc
    except (redis_errors.ClusterDownError, redis_errors.TryAgainError) as exc:
        # A cluster between layouts (a master restarting or failing over, a slot moving):
        # redis-py retried already; the caller may retry later.
        raise Unavailable(f"redis cluster unavailable: {exc}") from exc


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


async def due_members(redis: Redis, hints: Sequence[str], *, limit: int) -> list[tuple[str, str]]:
    """Up to ``limit`` (hint key, member) pairs of the sorted sets ``hints`` (the shards of one
    index, scored by when to look at each member, ms) that are due by the Redis clock, earliest
    first. One round trip for the clock, one pipeline for the shards (on a cluster, one
    request per master, in parallel)."""
    now_ms = time_ms(await redis.time())
    pipe = redis.pipeline(transaction=False)
    for key in hints:
        pipe.zrangebyscore(key, "-inf", now_ms, start=0, num=limit, withscores=True)
    replies = await pipe.execute()
    due = [
        (float(score), key, as_str(member))
        for key, reply in zip(hints, replies, strict=True)
        for member, score in reply
    ]
    due.sort(key=lambda entry: entry[0])
    return [(key, member) for _, key, member in due[:limit]]


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

"""Creating Redis clients and turning connection failures into domain errors."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import hiredis
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, ClusterPubSub
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
    pool = _Pool.from_url(
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
    pool.connection_class = writes_in_caller_task(pool.connection_class)
    return Redis.from_pool(pool)  # the client owns the pool and closes it


class _Pool(BlockingConnectionPool):
    """redis-py's blocking pool, with a fast path for the common case: a connection idle in
    the pool and no task waiting for one. redis-py's own path takes, per command, its
    condition's lock, a timeout, a generator-based context manager and an event dispatch on
    release (issue 16's chat path: 3 % of the server's samples, on every round trip). The fast
    path takes the idle connection (checked as redis-py checks it: connected, no unread data)
    and gives it back at once; while any task waits for a connection, in maintenance mode
    (redis-py's MOVING notifications) and for a connection to be reconnected, both go
    redis-py's way, so a waiting task is never overtaken."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._waiting = 0  # tasks in redis-py's get_connection (waiting for a connection)

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        idle: list[Any] = self._available_connections
        if idle and not self._waiting and not self._in_maintenance:
            connection = idle.pop()
            self._in_use_connections.add(connection)
            try:
                await self.ensure_connection(connection)
            except BaseException:
                await self.release(connection)
                raise
            return connection
        self._waiting += 1
        try:
            return await super().get_connection()  # type: ignore[no-untyped-call]
        finally:
            self._waiting -= 1

    async def release(self, connection: Any) -> None:
        if self._waiting or self._in_maintenance or connection.should_reconnect():
            await super().release(connection)
            return
        self._in_use_connections.remove(connection)
        self._available_connections.append(connection)
        await connection.re_auth()  # what redis-py's release event does (streaming credentials)


class PooledConnection:
    """A connection whose commands are written in the calling task, under ``asyncio.timeout``.

    redis-py bounds a write by the socket timeout with ``asyncio.wait_for``, which on Python
    3.11 wraps the write in a task of its own, with its future and timer: one task per round
    trip, on every command of the service (issue 16's chat path). This is the same bound
    without the task: the write is queued on the transport at once and only a drain that must
    wait (Redis not reading) waits, at most the socket timeout; then, as in redis-py, the
    connection is closed and the command fails with redis' TimeoutError (UNAVAILABLE). A write
    that went to the socket whole (the common case) arms no timer at all: its drain could
    neither wait nor fail (a lost connection closes the transport first)."""

    socket_timeout: float | None
    _writer: asyncio.StreamWriter

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        timeout = self.socket_timeout
        base = cast(Any, super())
        if not timeout:
            await base.send_packed_command(command, check_health)
            return
        connection = cast(Any, self)
        if not connection.is_connected:
            await connection.connect_check_health(check_health=False)
        if check_health:
            await connection.check_health()
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        writer = self._writer
        try:
            writer.writelines(command)
            transport = writer.transport
            # All of it on the socket and the connection open: drain would return at once,
            # so no timeout is armed for it (a timer per round trip otherwise).
            if transport.is_closing() or transport.get_write_buffer_size():
                async with asyncio.timeout(timeout):
                    await writer.drain()
        except TimeoutError:
            await connection.disconnect(nowait=True)
            raise redis_errors.TimeoutError("Timeout writing to socket") from None
        except OSError as e:
            await connection.disconnect(nowait=True)
            err_no, errmsg = ("UNKNOWN", e.args[0]) if len(e.args) == 1 else e.args[:2]
            raise redis_errors.ConnectionError(
                f"Error {err_no} while writing to socket. {errmsg}."
            ) from e
        except BaseException:  # a cancellation mid-write: the connection is in no known state
            await connection.disconnect(nowait=True)
            raise

    def pack_command(self, *args: Any) -> list[bytes]:
        """The command in the Redis protocol, byte for byte as redis-py packs it, packed by
        hiredis' C packer in one buffer: redis-py's asyncio connection packs in Python and
        re-joins its buffer at every argument (a queue enqueue of 100 items, 600 arguments:
        250 us against hiredis' 100). Arguments of other types (floats, memoryviews, bools,
        int subclasses), commands named with a space (``CONFIG GET``) and an encoder other
        than strict UTF-8 take redis-py's own path."""
        name = args[0]
        base = cast(Any, super())
        encoder = cast(Any, self).encoder
        if (
            type(name) is not str
            or " " in name
            or encoder.encoding != "utf-8"
            or encoder.encoding_errors != "strict"
        ):
            return cast(list[bytes], base.pack_command(*args))
        for arg in args:
            if type(arg) not in _PACKED_BY_HIREDIS:
                return cast(list[bytes], base.pack_command(*args))
        return [cast(bytes, hiredis.pack_command(args))]


# The argument types hiredis packs exactly as redis-py's encoder does (its floats differ in
# form from redis-py's repr; bools, which redis-py refuses, are ints to hiredis).
_PACKED_BY_HIREDIS = frozenset({str, bytes, int})


def writes_in_caller_task(base: type[T]) -> type[T]:
    """``base`` (the pool's connection class: TCP, TLS or Unix socket) with
    ``PooledConnection``'s writes and packing (one class per base)."""
    made = _IN_TASK.get(base)
    if made is None:
        made = _IN_TASK[base] = type(f"InTask{base.__name__}", (PooledConnection, base), {})
    return cast(type[T], made)


_IN_TASK: dict[type, type] = {}


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
    client's first call is a SUBSCRIBE), and again after a command failed to reach its node.

    redis-py re-reads the layout after a failed command of the cluster client, never after one
    of its pub/sub: once a master died, every new subscriber would pick it again from the same
    stale slot map (a failover's promoted replica never being tried), so its reader would
    reconnect to the dead node for ever."""

    cluster: _Cluster

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        await self.cluster.initialize()  # a no-op once initialized
        if self.connection is None and self.cluster.layout_stale:
            self.cluster.layout_stale = False
            await self.cluster.nodes_manager.initialize()
        try:
            return await super().execute_command(*args, **kwargs)
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError):
            self.cluster.layout_stale = True
            raise


class _ClusterPipeline(ClusterPipeline):
    """A cluster pipeline whose retries re-read the layout without closing other calls'
    connections (_Cluster.aclose)."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        token = _IN_A_CALL.set(True)
        try:
            return await super().execute(raise_on_error, allow_redirections)
        finally:
            _IN_A_CALL.reset(token)


# Set while redis-py runs one of our calls: an ``aclose`` it makes then is its own error
# handling asking for a new layout (_Cluster.aclose), not the owner closing the client.
_IN_A_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("in_a_call", default=False)


class _Cluster(RedisCluster):
    """``RedisCluster`` that reads the layout before a command picks its node, whose re-reads
    of the layout leave other calls' connections alone, and whose pub/sub works as a first
    call and follows a failover. Classic SUBSCRIBE on any node hears every PUBLISH of the
    cluster (messages are broadcast over the cluster bus)."""

    # A subscriber failed to reach its node: the next one re-reads the layout first.
    layout_stale = False

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        # redis-py picks a command's node before it reads the layout: on a client with none
        # (new, or after a failed command dropped it) a keyed command goes to a random node.
        # Its MOVED replies then add up to a full re-read (see aclose).
        if self._initialize:
            await self.initialize()
        token = _IN_A_CALL.set(True)
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            _IN_A_CALL.reset(token)

    async def aclose(self) -> None:
        """Close the client; but when redis-py calls this from inside a call (on CLUSTERDOWN,
        a slot no node serves, every ``reinitialize_steps`` MOVED replies, or a pipeline's
        lost connection) to re-read the layout, only mark the layout for re-reading. redis-py
        closes every connection of every node there, those of other calls in flight too: a
        slot moving or one master failing over would fail calls on the healthy masters. The
        failed call's own connection is dropped by redis-py already, and a node gone from the
        new layout has its idle connections closed when the layout is read."""
        if _IN_A_CALL.get():
            self._initialize = True
            return
        await super().aclose()

    def pipeline(self, transaction: bool | None = None, shard_hint: Any = None) -> ClusterPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # refused there
        return _ClusterPipeline(self, transaction)  # type: ignore[abstract]

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


# A cluster between a master's death and its replica's promotion: CLUSTERDOWN, TRYAGAIN, a slot
# no node serves for a moment. A call made again shortly succeeds, as after a lost connection.
_FAILOVER_ERRORS = (
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.SlotNotCoveredError,
)


def _closed_transport(exc: BaseException) -> bool:
    """uvloop's RuntimeError for a write on a connection whose peer just died ("unable to
    perform operation on <TCPTransport closed=True ...>; the handler is closed"), which
    redis-py lets through instead of raising ConnectionError (seen when a master is killed)."""
    return isinstance(exc, RuntimeError) and "the handler is closed" in str(exc)


def _torn_down_connection(exc: BaseException) -> bool:
    """redis-py's AttributeError for a command sent on a connection whose reader or writer a
    concurrent disconnect had just dropped ("'NoneType' object has no attribute 'writelines'",
    raised inside redis-py; seen on a cluster node's connection while its master was killed).
    An AttributeError raised anywhere else is a bug and is left alone."""
    if not isinstance(exc, AttributeError) or "'NoneType' object" not in str(exc):
        return False
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and "redis" in Path(frame.tb_frame.f_code.co_filename).parts


def unavailable_from(exc: BaseException) -> Unavailable | None:
    """``exc`` as domain.errors.Unavailable when it is a connection-level Redis failure (one
    that a later call may not meet), else None."""
    if isinstance(exc, redis_errors.BusyLoadingError):
        return Unavailable(f"redis is loading: {exc}")
    if isinstance(exc, (redis_errors.ConnectionError, redis_errors.TimeoutError)):
        return Unavailable(f"redis unavailable: {exc}")
    if isinstance(exc, _FAILOVER_ERRORS) or _closed_transport(exc) or _torn_down_connection(exc):
        return Unavailable(f"redis unavailable (failing over): {exc}")
    if isinstance(exc, redis_errors.ResponseError) and str(exc).startswith("NOREPLICAS"):
        # min-replicas-to-write: the master has too few replicas in sync to take writes.
        return Unavailable(f"redis refuses writes: {exc}")
    return None


@contextmanager
def redis_errors_as_unavailable() -> Iterator[None]:
    """Map connection-level Redis failures (and a cluster's failover) to
    domain.errors.Unavailable."""
    try:
        yield
    except (
        redis_errors.ConnectionError,
        redis_errors.TimeoutError,
        redis_errors.ResponseError,
        *_FAILOVER_ERRORS,
        RuntimeError,
        AttributeError,
    ) as exc:
        unavailable = unavailable_from(exc)
        if unavailable is None:
            raise
        raise unavailable from exc


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

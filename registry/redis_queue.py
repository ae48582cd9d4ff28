"""The work queue on Redis Streams consumer groups (no queue library).

Design (key layout in registry/lua/prelude/queue.lua, scripts in registry/lua/queue/):

- **Priorities and fairness.** One stream per (priority, tenant), each with consumer group
  ``w``. Per level a rotation list holds the tenants that may have undelivered entries; dequeue
  walks the levels highest first and, within a level, takes one entry from the tenant at the
  head of the rotation and moves it to the tail (``LMOVE``). So a tenant with 10,000 queued
  items and another with one alternate: the single item is served on the second turn.
- **At-least-once.** Reading an entry (``XREADGROUP``) leaves it in the group's pending entries
  list with its consumer and idle time; that pending entry *is* the lease. A running item's
  worker renews it with ``XCLAIM <self> ... JUSTID`` (resets idle time, no delivery counted).
  When a consumer dies, its entries go idle; a later dequeue (at most every lease/4 per queue)
  claims entries idle for a whole lease with ``XAUTOCLAIM`` and delivers them again.
- **Exactly-once results.** Completion is a compare-and-set on the item's hash: the first result
  of an unfinished item is stored; a redelivered item that already finished is only acknowledged
  (``XACK`` + ``XDEL``) and the second result discarded.
- **Retries and dead letter.** A failure acknowledges the entry and puts the item id in a delayed
  sorted set scored by due time (exponential backoff); dequeue moves due ids back to their
  stream. After ``max_deliveries`` deliveries (expired leases included) the item goes to the
  ``dead`` stream, listed by ``list_dead`` and put back by ``redrive`` with deliveries reset.
- **Bounded, never lossy.** Streams are never trimmed (MAXLEN would drop unacknowledged
  entries); every acknowledged entry is deleted, and an empty stream is dropped with its group.
  Finished records expire after ``result_ttl_ms``; dead ones stay until redriven.
- **Waiting without polling.** One pub/sub connection per queue object carries "item finished"
  and "work ready" notices to every local waiter; waiters re-check Redis only on a notice, on a
  reconnect, or every few seconds as a safety net, never in a tight loop. Reads on that
  connection use a bounded ``get_message`` timeout, so the client's socket timeout never cuts a
  blocking read short.

The client must be created with ``decode_responses=False`` (payloads and results are opaque
bytes); :func:`create_queue_redis` makes one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from itertools import accumulate
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from domain.ports.queue import (
    PRIORITY_ORDER,
    DeadLetter,
    FailOutcome,
    NewWorkItem,
    PriorityDepth,
    QueueConfig,
    QueuePriority,
    QueueStats,
    ResultStatus,
    WorkItem,
    WorkResult,
)
from registry.keys import KeySpace
from registry.lua_scripts import ScriptRunner
from registry.redis_client import (
    RedisStore,
    as_str,
    cancel_and_wait,
    create_redis,
    redis_errors_as_unavailable,
)

log = logging.getLogger(__name__)

# A waiter re-reads its result this often even without a notice (a lost message is possible
# only around a reconnect, which also wakes every waiter; this is the last resort).
_SAFETY_RECHECK_S = 5.0
# How long one pub/sub read waits before the listener loop checks whether it should stop.
_LISTEN_TICK_S = 1.0


def create_queue_redis(
    url: str,
    *,
    socket_timeout_s: float = 2.0,
    connect_timeout_s: float = 1.0,
    max_connections: int = 64,
    client_name: str = "agent-orchestrator-queue",
) -> Redis:
    """A pooled client for the queue: registry.redis_client.create_redis returning raw bytes,
    so payloads and results need no encoding. Its pool blocks when every connection is busy:
    many concurrent waiters and completions are normal for a queue."""
    return create_redis(
        url,
        socket_timeout_s=socket_timeout_s,
        connect_timeout_s=connect_timeout_s,
        max_connections=max_connections,
        client_name=client_name,
        decode_responses=False,
    )


class _Listener:
    """One pub/sub subscription shared by every waiter of a queue object."""

    def __init__(self, redis: Redis, done_channel: str, ready_channel: str) -> None:
        self._redis = redis
        self._done_channel = done_channel.encode()
        self._ready_channel = ready_channel.encode()
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self.work_ready = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def ensure_started(self, timeout_s: float = 2.0) -> bool:
        """Start the listener once; True when it is subscribed (notices will arrive)."""
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run(), name="work-queue-listener")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), timeout_s)
        return self._subscribed.is_set()

    def watch(self, item_id: str) -> asyncio.Event:
        event = asyncio.Event()
        self._waiters.setdefault(item_id, set()).add(event)
        return event

    def unwatch(self, item_id: str, event: asyncio.Event) -> None:
        events = self._waiters.get(item_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self._waiters[item_id]

    def wake_all(self) -> None:
        self.work_ready.set()
        for events in self._waiters.values():
            for event in events:
                event.set()

    async def aclose(self) -> None:
        self._closed = True
        await cancel_and_wait(self._task)
        self.wake_all()

    async def _run(self) -> None:
        while not self._closed:
            pubsub: PubSub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self._done_channel, self._ready_channel)
                self._subscribed.set()
                self.wake_all()  # anything may have happened while we were not listening
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=_LISTEN_TICK_S
                    )
                    if message is not None:
                        self._dispatch(message)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
                self._subscribed.clear()
                log.warning("work queue listener lost its connection: %s", exc)
                await asyncio.sleep(0.2)
            except Exception:  # keep listening whatever happens; waiters re-check on wake
                self._subscribed.clear()
                log.exception("work queue listener failed; restarting it")
                await asyncio.sleep(0.2)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel = message.get("channel")
        if channel == self._ready_channel:
            self.work_ready.set()
            return
        data = message.get("data")
        if channel != self._done_channel or not isinstance(data, bytes):
            return
        for item_id in data.decode().split(","):
            for event in self._waiters.get(item_id, ()):
                event.set()


class RedisWorkQueue(RedisStore):
    """domain.ports.queue.WorkQueue on Redis Streams."""

    SCRIPTS = "queue"

    def __init__(
        self,
        redis: Redis,
        keys: KeySpace,
        *,
        queue: str = "work",
        config: QueueConfig | None = None,
    ) -> None:
        if redis.get_connection_kwargs().get("decode_responses"):  # type: ignore[no-untyped-call]
            raise ValueError("the work queue needs a client with decode_responses=False")
        super().__init__(redis, keys)
        self._queue = queue
        self._prefix = keys.work_queue(queue)
        # The scripts take no KEYS: the prefix routes them to the queue's slot on a cluster.
        self._scripts = ScriptRunner(redis, self.SCRIPTS, route=self._prefix)
        self._config = config or QueueConfig()
        self._listener = _Listener(redis, self._prefix + "ch:done", self._prefix + "ch:ready")

    @property
    def redis(self) -> Redis:
        """The client the queue uses."""
        return self._redis

    @property
    def prefix(self) -> str:
        """The prefix of every key of this queue."""
        return self._prefix

    async def enqueue(self, items: Sequence[NewWorkItem]) -> int:
        if not items:
            return 0
        args: list[str | bytes] = [self._prefix]
        for item in items:
            args += [
                item.item_id,
                item.tenant_id,
                item.kind,
                item.priority.value,
                item.batch_id or "",
                item.payload,
            ]
        with redis_errors_as_unavailable():
            return int(await self._scripts.run("enqueue", args=args))

    async def dequeue(
        self, consumer: str, *, count: int, lease_ms: int, wait_ms: int = 0
    ) -> list[WorkItem]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_ms / 1000.0
        args: list[str | int] = [
            self._prefix,
            consumer,
            count,
            lease_ms,
            self._config.max_deliveries,
        ]
        while True:
            if wait_ms > 0:
                await self._listener.ensure_started()
                self._listener.work_ready.clear()
            with redis_errors_as_unavailable():
                values, lengths, hint_ms = await self._scripts.run("dequeue", args=args)
            items = self._items(consumer, values, lengths)
            remaining = deadline - loop.time()
            if items or remaining <= 0:
                return items
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._listener.work_ready.wait(), min(remaining, int(hint_ms) / 1000.0)
                )

    async def renew(self, item: WorkItem) -> bool:
        with redis_errors_as_unavailable():
            held = await self._scripts.run(
                "renew", args=[self._prefix, item.consumer, self._stream(item), item.receipt]
            )
        return bool(held[0])

    async def complete(self, results: Sequence[tuple[WorkItem, bytes]]) -> list[bool]:
        if not results:
            return []
        args: list[str | bytes | int] = [self._prefix, self._config.result_ttl_ms]
        for item, value in results:
            args += [item.item_id, self._stream(item), item.receipt, value]
        with redis_errors_as_unavailable():
            stored = await self._scripts.run("complete", args=args)
        return [bool(flag) for flag in stored]

    async def fail(self, item: WorkItem, error: str, *, retry: bool = True) -> FailOutcome:
        config = self._config
        with redis_errors_as_unavailable():
            outcome = await self._scripts.run(
                "fail",
                args=[
                    *self._delivery(item),
                    error,
                    "1" if retry else "0",
                    config.max_deliveries,
                    config.retry_base_ms,
                    config.retry_cap_ms,
                ],
            )
        return FailOutcome(as_str(outcome))

    async def release(self, item: WorkItem, *, delay_ms: int = 0) -> bool:
        with redis_errors_as_unavailable():
            released = await self._scripts.run(
                "release",
                args=[*self._delivery(item), delay_ms],
            )
        return bool(released)

    def _delivery(self, item: WorkItem) -> list[str]:
        """The first arguments of the scripts that end or give back one delivery (fail,
        release): the queue's prefix, the item, its stream, the delivery's receipt and
        consumer."""
        return [self._prefix, item.item_id, self._stream(item), item.receipt, item.consumer]

    async def get_result(self, item_id: str) -> WorkResult | None:
        with redis_errors_as_unavailable():
            state, value, error, deliveries, finished = await self._redis.hmget(
                self._keys.work_item(self._queue, item_id), ["st", "v", "err", "n", "f"]
            )
        if state not in (b"done", b"dead"):
            return None
        done = state == b"done"
        return WorkResult(
            item_id=item_id,
            status=ResultStatus.SUCCEEDED if done else ResultStatus.FAILED,
            value=value if done and isinstance(value, bytes) else None,
            error=None if done else as_str(error or b""),
            deliveries=int(deliveries or 0),
            finished_at_ms=int(finished or 0),
        )

    async def wait_result(self, item_id: str, timeout_s: float) -> WorkResult | None:
        result = await self.get_result(item_id)
        if result is not None or timeout_s <= 0:
            return result
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        event = self._listener.watch(item_id)
        try:
            await self._listener.ensure_started(min(timeout_s, 2.0))
            while True:
                # Checked after subscribing and after each notice: no finish can slip between.
                event.clear()
                result = await self.get_result(item_id)
                remaining = deadline - loop.time()
                if result is not None or remaining <= 0:
                    return result
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(remaining, _SAFETY_RECHECK_S))
        finally:
            self._listener.unwatch(item_id, event)

    async def list_dead(self, *, limit: int = 100, after: str | None = None) -> list[DeadLetter]:
        start = f"({after}" if after else "-"
        with redis_errors_as_unavailable():
            entries: list[tuple[bytes, dict[bytes, bytes]]] = await self._redis.xrange(  # type: ignore[assignment]
                self._prefix + "dead", start, "+", count=limit
            )
            if not entries:
                return []
            pipe = self._redis.pipeline(transaction=False)
            for _, fields in entries:
                pipe.hgetall(self._keys.work_item(self._queue, as_str(fields[b"i"])))
            records = await pipe.execute()
        found: list[DeadLetter] = []
        for (position, fields), record in zip(entries, records, strict=True):
            if not record:
                continue
            found.append(_dead_letter(as_str(fields[b"i"]), as_str(position), record))
        return found

    async def redrive(self, item_id: str) -> bool:
        with redis_errors_as_unavailable():
            return bool(await self._scripts.run("redrive", args=[self._prefix, item_id]))

    async def stats(self) -> QueueStats:
        with redis_errors_as_unavailable():
            ready, leased, delayed, dead = await self._scripts.run("stats", args=[self._prefix])
        return QueueStats(int(ready), int(leased), int(delayed), int(dead))

    async def get_dead(self, item_id: str) -> DeadLetter | None:
        with redis_errors_as_unavailable():
            record: dict[bytes, bytes] = await self._redis.hgetall(  # type: ignore[assignment]
                self._keys.work_item(self._queue, item_id)
            )
        if record.get(b"st") != b"dead":
            return None
        return _dead_letter(item_id, as_str(record.get(b"x", b"")), record)

    async def depth(self, tenant_id: str | None = None) -> list[PriorityDepth]:
        with redis_errors_as_unavailable():
            flat = await self._scripts.run("depth", args=[self._prefix, tenant_id or ""])
        found = {
            as_str(flat[i]): [int(n) for n in flat[i + 1 : i + 5]] for i in range(0, len(flat), 5)
        }
        return [
            PriorityDepth(priority, *found.get(priority.value, [0, 0, 0, 0]))
            for priority in PRIORITY_ORDER
        ]

    async def aclose(self) -> None:
        await self._listener.aclose()

    def _stream(self, item: WorkItem) -> str:
        return self._keys.work_stream(self._queue, item.priority.value, item.tenant_id)

    @staticmethod
    def _items(consumer: str, values: bytes, lengths: bytes) -> list[WorkItem]:
        """Decode the dequeue script's reply: nine fields per item back to back in ``values``,
        their lengths in ``lengths``."""
        at = list(accumulate(map(int, lengths.split()), initial=0))
        items: list[WorkItem] = []
        for i in range(0, len(at) - 1, 9):
            # id, entry, tenant, kind, priority, batch, payload, deliveries, enqueued_ms
            o = at[i : i + 10]
            items.append(
                WorkItem(
                    item_id=values[o[0] : o[1]].decode(),
                    tenant_id=values[o[2] : o[3]].decode(),
                    kind=values[o[3] : o[4]].decode(),
                    payload=values[o[6] : o[7]],
                    priority=QueuePriority(values[o[4] : o[5]].decode()),
                    batch_id=values[o[5] : o[6]].decode() or None,
                    deliveries=int(values[o[7] : o[8]]),
                    enqueued_at_ms=int(values[o[8] : o[9]]),
                    consumer=consumer,
                    receipt=values[o[1] : o[2]].decode(),
                )
            )
        return items


def _dead_letter(item_id: str, position: str, record: dict[bytes, bytes]) -> DeadLetter:
    """A dead item's record (its hash) as a DeadLetter."""
    return DeadLetter(
        item_id=item_id,
        tenant_id=as_str(record[b"t"]),
        kind=as_str(record[b"k"]),
        payload=record.get(b"d", b""),
        priority=QueuePriority(as_str(record[b"p"])),
        batch_id=as_str(record[b"b"]) or None,
        deliveries=int(record[b"n"]),
        error=as_str(record.get(b"err", b"")),
        dead_at_ms=int(record.get(b"f", 0)),
        position=position,
    )

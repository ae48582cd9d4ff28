"""The work queue on Redis Streams consumer groups (no queue library).

Design (key layout in registry/lua/prelude/queue.lua, scripts in registry/lua/queue/, ADR 0014
for the shards):

- **Shards.** A queue is split into ``shards`` shards (``ORCH_QUEUE_SHARDS``; 1 on one Redis,
  8 on a cluster), each a complete queue under a hash tag of its own (``KeySpace.work_queue``),
  so on a cluster the shards sit in different slots, spread over the masters, and no script
  touches two slots. Shard 0 keeps the unsharded tag ``{q:<queue>}``: items queued before the
  sharding run after it. Every item of a tenant goes to one shard (``queue_shard_of``), which
  keeps the tenant's order and its place in its shard's rotation. A delivery's receipt names
  its shard (``<shard>/<entry>``; shard 0's receipts are bare entry ids, as before), so
  renew, complete, fail and release go straight to it (renew and complete take many
  deliveries: one script call per shard in one pipeline); reads by item id alone (results, dead
  letters, redrive) ask every shard in one pipeline. A one-shard queue runs every dequeue as
  one script, as before the sharding.
- **Dequeue across shards.** One pipeline (one round trip; on a cluster one per master, in
  parallel) runs ``dequeue`` in mode ``peek`` on every shard: due retries back to their
  streams, expired leases reclaimed (up to count per shard; a surplus over count is released
  at once), and the shard's number of tenants with undelivered work per level. Then take
  rounds (usually one) run mode ``take`` on the shards holding the highest level present
  anywhere, never serving below it, so a higher-priority item in any shard goes before a
  lower one. The count is shared among those shards by their tenants at that level, with a
  smooth weighted round robin whose credit carries over between calls: a tenant alone in its
  shard gets the same turns as one among many in another, and single-item dequeues alternate.
  The items of a round are interleaved shard by shard, turn by turn. A round that leaves
  count unfilled while a shard still has work runs again (at most ``_TAKE_ROUNDS``).
- **Priorities and fairness.** One stream per (priority, tenant), each with consumer group
  ``w``. Per level a rotation list holds the tenants that may have undelivered entries; dequeue
  walks the levels highest first and, within a level, takes one entry from the tenant at the
  head of the rotation and moves it to the tail (``LMOVE``); a tenant leaves the rotation as
  soon as the entry it was served is its stream's last, so a rotation's length is the number
  of tenants with work at its level (the peek reads it). So a tenant with 10,000 queued
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
  and "work ready" notices of every shard (each shard publishes on its own ``ch:done`` and
  ``ch:ready``; classic pub/sub, broadcast over a cluster) to every local waiter; waiters
  re-check Redis only on a notice, on a reconnect, or every few seconds as a safety net,
  never in a tight loop. Reads on that connection use a bounded ``get_message`` timeout, so
  the client's socket timeout never cuts a blocking read short. A sharded queue also keeps,
  from the ready notices (each names the highest level that became ready), its view of which
  shard has work at which level: while the listener stays subscribed, a dequeue trusts that
  view for up to the peek's wait hint (at most a second) and skips the peek, one round trip
  instead of two. Priority across shards then holds as of the latest notice (a notice is
  sub-millisecond behind its enqueue; this process's own enqueues count at once).

The client must be created with ``decode_responses=False`` (payloads and results are opaque
bytes); :func:`create_queue_redis` makes one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from itertools import accumulate, zip_longest
from struct import unpack
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import NoScriptError

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
from registry.keys import MAX_QUEUE_SHARDS, KeySpace, queue_shard_of, work_stream_key
from registry.lua_scripts import ScriptPipeline, ScriptRunner, scripts_lost
from registry.redis_client import (
    RedisStore,
    as_str,
    cancel_and_wait,
    create_redis,
    is_cluster,
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

    def __init__(
        self,
        redis: Redis,
        done_channels: list[str],
        ready_channels: list[str],
        on_ready: Callable[[int, bytes], None] | None = None,
    ) -> None:
        self._redis = redis
        self._done_channels = {channel.encode() for channel in done_channels}
        # A ready notice is passed on with the index of its channel (the shard) and its data.
        self._ready_channels = {channel.encode(): i for i, channel in enumerate(ready_channels)}
        self._on_ready = on_ready
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self.work_ready = asyncio.Event()
        # Counts the subscriptions made: notices are known complete since the current one only.
        self.epoch = 0
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

    @property
    def listening(self) -> bool:
        """Subscribed now: every notice from now on arrives (until the connection is lost)."""
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
                await pubsub.subscribe(*self._done_channels, *self._ready_channels)
                self.epoch += 1
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
        data = message.get("data")
        shard = self._ready_channels.get(channel) if isinstance(channel, bytes) else None
        if shard is not None:
            self.work_ready.set()
            if self._on_ready is not None:
                self._on_ready(shard, data if isinstance(data, bytes) else b"")
            return
        if channel not in self._done_channels or not isinstance(data, bytes):
            return
        for item_id in data.decode().split(","):
            for event in self._waiters.get(item_id, ()):
                event.set()


# How many take rounds one dequeue of a sharded queue makes at most after its peek.
_TAKE_ROUNDS = 4
# Longest a sharded queue trusts its view of the shards without a peek.
_VIEW_TTL_S = 1.0
# Ready notices kept between peeks at most (then the view is dropped).
_NOTICES_KEPT = 1000
_LEVELS = {priority.value.encode(): i for i, priority in enumerate(PRIORITY_ORDER)}
# A priority level by its name as the scripts return it.
_PRIORITIES = {priority.value.encode(): priority for priority in QueuePriority}
# Shards of a work queue when ORCH_QUEUE_SHARDS is unset: one Redis runs every shard on its one
# thread (more shards only cost round trips), while a cluster needs shards on each master.
DEFAULT_SHARDS_SINGLE = 1
DEFAULT_SHARDS_CLUSTER = 8


def default_queue_shards(redis: Redis) -> int:
    """The shard count of a work queue on ``redis`` when none is configured."""
    return DEFAULT_SHARDS_CLUSTER if is_cluster(redis) else DEFAULT_SHARDS_SINGLE


class RedisWorkQueue(RedisStore):
    """domain.ports.queue.WorkQueue on Redis Streams, split into ``shards`` shards."""

    SCRIPTS = "queue"

    def __init__(
        self,
        redis: Redis,
        keys: KeySpace,
        *,
        queue: str = "work",
        config: QueueConfig | None = None,
        shards: int | None = None,
    ) -> None:
        if redis.get_connection_kwargs().get("decode_responses"):  # type: ignore[no-untyped-call]
            raise ValueError("the work queue needs a client with decode_responses=False")
        count = default_queue_shards(redis) if shards is None else shards
        if not 1 <= count <= MAX_QUEUE_SHARDS:
            raise ValueError(f"a work queue has 1 to {MAX_QUEUE_SHARDS} shards, not {count}")
        super().__init__(redis, keys)
        self._queue = queue
        self._shards = count
        self._prefixes = [keys.work_queue(queue, shard) for shard in range(count)]
        self._prefix = self._prefixes[0]
        # The scripts take no KEYS: the prefix routes them to their shard's slot on a cluster.
        self._runners = [ScriptRunner(redis, self.SCRIPTS, route=p) for p in self._prefixes]
        self._scripts = self._runners[0]
        self._config = config or QueueConfig()
        self._listener = _Listener(
            redis,
            [p + "ch:done" for p in self._prefixes],
            [p + "ch:ready" for p in self._prefixes],
            self._noticed if count > 1 else None,
        )
        # A sharded queue's view of its shards: per shard, the tenants with work at each level
        # (PRIORITY_ORDER), from the last peek, the takes since and the ready notices since
        # (each names its highest level). Trusted instead of a peek only while the listener
        # has stayed subscribed since the peek, and for at most the peek's wait hint (a retry
        # falling due or a lease scan, which only a peek does) or _VIEW_TTL_S.
        self._view: dict[int, list[int]] | None = None
        self._view_epoch = -1
        self._view_until = 0.0
        # The ready notices (shard, level or None) since the last peek began.
        self._notices: list[tuple[int, int | None]] = []
        # Smooth weighted round robin over the shards (weight: tenants with work at the level
        # served), so tenants in different shards take turns as they do within one shard.
        self._credit: dict[int, int] = {}

    @property
    def redis(self) -> Redis:
        """The client the queue uses."""
        return self._redis

    @property
    def prefix(self) -> str:
        """The prefix of every key of shard 0 (the whole queue when it has one shard)."""
        return self._prefix

    @property
    def prefixes(self) -> list[str]:
        """The key prefix of each shard, in shard order."""
        return list(self._prefixes)

    def shard_of(self, tenant_id: str) -> int:
        """The shard that receives the items of ``tenant_id``."""
        return queue_shard_of(tenant_id, self._shards)

    async def enqueue(self, items: Sequence[NewWorkItem]) -> int:
        if not items:
            return 0
        per_shard: dict[int, list[str | bytes]] = {}
        best: dict[int, int] = {}  # per shard, the highest level enqueued (its index)
        sharded = self._shards > 1
        for item in items:
            shard = 0
            if sharded:
                shard = self.shard_of(item.tenant_id)
                level = PRIORITY_ORDER.index(item.priority)
                best[shard] = min(best.get(shard, level), level)
            args = per_shard.get(shard)
            if args is None:
                args = per_shard[shard] = [self._prefixes[shard]]
            args += (
                item.item_id,
                item.tenant_id,
                item.kind,
                str(item.priority),  # its value as a plain str (Enum.value costs a property)
                item.batch_id or "",
                item.payload,
            )
        with redis_errors_as_unavailable():
            if len(per_shard) == 1:
                [(shard, args)] = per_shard.items()
                added = [await self._runners[shard].run("enqueue", args=args)]
            else:
                added = await self._on_shards(
                    "enqueue", [(shard, args[1:]) for shard, args in per_shard.items()]
                )
        if sharded:
            # This process's dequeues see its own enqueues at once, before their notices.
            for shard, level in best.items():
                self._noticed(shard, PRIORITY_ORDER[level].value.encode())
        return sum(int(n) for n in added)

    async def dequeue(
        self, consumer: str, *, count: int, lease_ms: int, wait_ms: int = 0
    ) -> list[WorkItem]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_ms / 1000.0
        while True:
            if wait_ms > 0:
                await self._listener.ensure_started()
                self._listener.work_ready.clear()
            with redis_errors_as_unavailable():
                if self._shards == 1:
                    items, hint_ms = await self._dequeue_one(consumer, count, lease_ms)
                else:
                    items, hint_ms = await self._dequeue_sharded(consumer, count, lease_ms)
            remaining = deadline - loop.time()
            if items or remaining <= 0:
                return items
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._listener.work_ready.wait(), min(remaining, hint_ms / 1000.0)
                )

    async def _dequeue_one(
        self, consumer: str, count: int, lease_ms: int
    ) -> tuple[list[WorkItem], int]:
        """The whole dequeue of an unsharded queue: one script, one round trip."""
        values, lengths, hint_ms, *_ = await self._scripts.run(
            "dequeue",
            args=[
                self._prefix,
                consumer,
                count,
                lease_ms,
                self._config.max_deliveries,
                "all",
                "low",
            ],
        )
        return self._items(consumer, values, lengths, 0), int(hint_ms)

    async def _dequeue_sharded(
        self, consumer: str, count: int, lease_ms: int
    ) -> tuple[list[WorkItem], int]:
        """Dequeue across the shards: a peek at every shard in one round trip (due retries
        and expired leases handled there, each shard's levels read; skipped while the view of
        the shards is fresh), then take rounds that lease new entries of the highest level any
        shard has, shared among the shards holding it by their number of tenants at that level
        (smooth weighted round robin, so a tenant alone in its shard takes its turn like a
        tenant in a crowded one)."""
        loop = asyncio.get_running_loop()
        base: list[str | bytes | int] = [consumer, count, lease_ms, self._config.max_deliveries]
        listener = self._listener
        items: list[WorkItem] = []
        hint_ms = max(lease_ms, 10)
        for attempt in (1, 2):
            now = loop.time()
            view = self._view
            if (
                attempt == 1
                and view is not None
                and listener.listening
                and listener.epoch == self._view_epoch
                and now < self._view_until
            ):
                levels = view
                hint_ms = max(int((self._view_until - now) * 1000), 1)
            else:
                view = None
                levels, hint_ms = await self._peek(base, items, count, lease_ms)
            expected = any(any(t) for t in levels.values())
            got = len(items)
            await self._take_rounds(base, items, count, levels)
            if view is None or len(items) > got or not expected:
                break
            # The view promised work that was gone (taken by other consumers): look again.
            self._view = None
        return items, hint_ms

    async def _peek(
        self, base: list[str | bytes | int], items: list[WorkItem], count: int, lease_ms: int
    ) -> tuple[dict[int, list[int]], int]:
        """Run mode 'peek' on every shard (one round trip); reclaimed items are added to
        ``items`` (a surplus over ``count`` released). Returns each shard's levels, which
        become the view of the shards, and the wait hint."""
        loop = asyncio.get_running_loop()
        listener = self._listener
        epoch = listener.epoch if listener.listening else -1
        started = loop.time()
        self._notices = []
        peeked = await self._on_shards(
            "dequeue", [(shard, [*base, "peek", "low"]) for shard in range(self._shards)]
        )
        levels: dict[int, list[int]] = {}
        hint_ms = max(lease_ms, 10)
        reclaimed: list[WorkItem] = []
        for shard, (values, lengths, hint, *tenants) in enumerate(peeked):
            reclaimed += self._items(str(base[0]), values, lengths, shard)
            hint_ms = min(hint_ms, int(hint))
            levels[shard] = [int(n) for n in tenants]
        if len(items) + len(reclaimed) > count:
            # Expired leases reclaimed by several shards at once beyond count (each shard may
            # reclaim up to count): give the surplus back at once, its delivery not counted.
            keep = count - len(items)
            await self._release_all(reclaimed[keep:])
            reclaimed = reclaimed[:keep]
        items += reclaimed
        # Notices that arrived while the peek was under way may be missing from its replies.
        valid = self._replay(levels, self._notices)
        self._view = levels if valid else None
        self._view_epoch = epoch
        self._view_until = started + min(hint_ms / 1000.0, _VIEW_TTL_S)
        return levels, hint_ms

    async def _take_rounds(
        self,
        base: list[str | bytes | int],
        items: list[WorkItem],
        count: int,
        levels: dict[int, list[int]],
    ) -> None:
        """Lease new entries into ``items`` up to ``count``, from the highest level present,
        updating ``levels`` with each shard's state after its take."""
        for _ in range(_TAKE_ROUNDS):
            want = count - len(items)
            best = next(
                (lv for lv in range(len(PRIORITY_ORDER)) if any(t[lv] for t in levels.values())),
                None,
            )
            if want <= 0 or best is None:
                return
            shares = self._share({s: t[best] for s, t in levels.items() if t[best]}, want)
            floor = PRIORITY_ORDER[best].value
            calls: list[tuple[int, list[str | bytes | int]]] = [
                (shard, [*base[:1], n, *base[2:], "take", floor]) for shard, n in shares.items()
            ]
            seen = len(self._notices)
            taken: list[list[WorkItem]] = []
            for (shard, _), (values, lengths, _hint, *tenants) in zip(
                calls, await self._on_shards("dequeue", calls), strict=True
            ):
                taken.append(self._items(str(base[0]), values, lengths, shard))
                levels[shard] = [int(n) for n in tenants]
            if not self._replay(levels, self._notices[seen:]) and levels is self._view:
                self._view = None
            # Interleaved: each shard's items come in its tenants' turns, so turn by turn.
            items += [item for turn in zip_longest(*taken) for item in turn if item is not None]

    def _noticed(self, shard: int, data: bytes) -> None:
        """A ready notice of ``shard`` (data: the highest level that became ready)."""
        level = _LEVELS.get(data)
        if len(self._notices) >= _NOTICES_KEPT:
            # Nobody dequeued for long: forget the view rather than keep every notice.
            self._notices = []
            self._view = None
        self._notices.append((shard, level))
        if self._view is not None and not self._replay(self._view, [(shard, level)]):
            self._view = None

    @staticmethod
    def _replay(levels: dict[int, list[int]], notices: Sequence[tuple[int, int | None]]) -> bool:
        """Count each noticed level as having work in ``levels``; False when a notice named
        no level (a release older than the sharding): the view is then not to be trusted."""
        for shard, level in notices:
            if level is None or shard not in levels:
                return False
            row = levels[shard]
            row[level] = max(row[level], 1)
        return True

    def _share(self, weights: dict[int, int], want: int) -> dict[int, int]:
        """Split ``want`` items among shards by weight: whole rounds of every weight, then one
        item at a time to the shard with the most credit (smooth weighted round robin; the
        credit carries over between calls, so single items alternate between shards)."""
        total = sum(weights.values())
        shares = dict.fromkeys(weights, 0)
        rounds, rest = divmod(want, total)
        if rounds:
            for shard, weight in weights.items():
                shares[shard] = weight * rounds
        credit = {shard: self._credit.get(shard, 0) for shard in weights}
        for _ in range(rest):
            for shard, weight in weights.items():
                credit[shard] += weight
            pick = max(credit, key=credit.__getitem__)
            credit[pick] -= total
            shares[pick] += 1
        self._credit = credit
        return {shard: n for shard, n in shares.items() if n}

    async def _release_all(self, items: Sequence[WorkItem]) -> None:
        await self._on_shards(
            "release", [(shard, [*args[1:], 0]) for shard, args in map(self._delivery, items)]
        )

    async def _on_shards(
        self, name: str, calls: Sequence[tuple[int, Sequence[str | bytes | int]]]
    ) -> list[Any]:
        """Run script ``name`` once per call (shard, ARGV after the prefix) in one pipeline:
        one round trip (on a cluster, one per node, in parallel). Only the calls that met a
        Redis without the script are sent again (the others ran)."""
        replies: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for attempt in (1, 2):

            def build(pipe: ScriptPipeline, todo: list[int] = pending) -> None:
                for i in todo:
                    shard, args = calls[i]
                    prefix = self._prefixes[shard]
                    pipe.run(name, keys=(prefix,), args=[prefix, *args])

            answers = await self._scripts.each_in_one_round_trip(build)
            retry: list[int] = []
            for i, answer in zip(pending, answers, strict=True):
                if isinstance(answer, NoScriptError):
                    if attempt == 2:
                        raise scripts_lost(answer)
                    retry.append(i)
                elif isinstance(answer, Exception):
                    raise answer
                else:
                    replies[i] = answer
            if not retry:
                break
            pending = retry
        return replies

    async def renew(self, items: Sequence[WorkItem]) -> list[bool]:
        # One script call per shard and consumer (the script renews for one consumer; a
        # worker's items all have its own).
        calls: dict[tuple[int, str], tuple[int, list[str | bytes | int]]] = {}
        order: list[tuple[int, str]] = []
        for item in items:
            shard, stream, entry = self._where(item)
            key = (shard, item.consumer)
            call = calls.get(key)
            if call is None:
                call = calls[key] = (shard, [self._prefixes[shard], item.consumer])
            call[1].extend((stream, entry))
            order.append(key)
        return await self._per_delivery("renew", calls, order)

    async def complete(self, results: Sequence[tuple[WorkItem, bytes]]) -> list[bool]:
        ttl = self._config.result_ttl_ms
        calls: dict[int, tuple[int, list[str | bytes | int]]] = {}
        order: list[int] = []
        for item, value in results:
            shard, stream, entry = self._where(item)
            call = calls.get(shard)
            if call is None:
                call = calls[shard] = (shard, [self._prefixes[shard], ttl])
            call[1].extend((item.item_id, stream, entry, value))
            order.append(shard)
        return await self._per_delivery("complete", calls, order)

    async def _per_delivery(
        self, name: str, calls: dict[Any, tuple[int, list[str | bytes | int]]], order: list[Any]
    ) -> list[bool]:
        """Run script ``name`` once per call (its shard, its ARGV from the shard's prefix on):
        a lone call as it is, several in one pipeline (one round trip; on a cluster one per
        node). Each call answers per delivery in its order; the answers come back in the
        caller's, ``order`` naming the call of each of its deliveries."""
        if not calls:
            return []
        with redis_errors_as_unavailable():
            if len(calls) == 1:
                [(shard, args)] = calls.values()
                return [bool(n) for n in await self._runners[shard].run(name, args=args)]
            replies = await self._on_shards(
                name, [(shard, args[1:]) for shard, args in calls.values()]
            )
        answers = {key: iter(reply) for key, reply in zip(calls, replies, strict=True)}
        return [bool(next(answers[key])) for key in order]

    async def fail(self, item: WorkItem, error: str, *, retry: bool = True) -> FailOutcome:
        config = self._config
        shard, delivery = self._delivery(item)
        with redis_errors_as_unavailable():
            outcome = await self._runners[shard].run(
                "fail",
                args=[
                    *delivery,
                    error,
                    "1" if retry else "0",
                    config.max_deliveries,
                    config.retry_base_ms,
                    config.retry_cap_ms,
                ],
            )
        return FailOutcome(as_str(outcome))

    async def release(self, item: WorkItem, *, delay_ms: int = 0) -> bool:
        shard, delivery = self._delivery(item)
        with redis_errors_as_unavailable():
            released = await self._runners[shard].run("release", args=[*delivery, delay_ms])
        return bool(released)

    def _delivery(self, item: WorkItem) -> tuple[int, list[str]]:
        """The delivery's shard and the first arguments of the scripts that end or give back
        one delivery (fail, release): the prefix of the item's shard, the item, its stream, the
        delivery's entry and consumer."""
        shard, stream, entry = self._where(item)
        return shard, [self._prefixes[shard], item.item_id, stream, entry, item.consumer]

    async def _find(self, item_id: str, fields: Sequence[str]) -> tuple[int, list[Any]]:
        """The item's shard and the ``fields`` of its record, read from every shard in one
        pipeline (callers of these calls know the item's id alone); (0, Nones) when no shard
        knows it. A record that finished wins over one that did not (the same id enqueued
        under two tenants, in two shards)."""
        if self._shards == 1:
            return 0, list(
                await self._redis.hmget(self._keys.work_item(self._queue, item_id), fields)
            )
        pipe = self._redis.pipeline(transaction=False)
        for shard in range(self._shards):
            pipe.hmget(self._keys.work_item(self._queue, item_id, shard), fields)
        records: list[list[Any]] = list(await pipe.execute())
        found = [(shard, r) for shard, r in enumerate(records) if r[0] is not None]
        if not found:
            return 0, records[0]
        return next(((s, r) for s, r in found if r[0] in (b"done", b"dead")), found[0])

    async def get_result(self, item_id: str) -> WorkResult | None:
        with redis_errors_as_unavailable():
            _, (state, value, error, deliveries, finished) = await self._find(
                item_id, ["st", "v", "err", "n", "f"]
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
        """The dead letters of every shard in order of death (entry id, then shard), from
        after the position ``after`` (``<entry>`` in shard 0, ``<shard>/<entry>`` in others)."""
        after_shard, after_entry = _split_receipt(after) if after else (0, "")
        with redis_errors_as_unavailable():
            pipe = self._redis.pipeline(transaction=False)
            for shard, prefix in enumerate(self._prefixes):
                # Entries equal to after_entry sort after it in a later shard only.
                if not after_entry:
                    start = "-"
                elif shard > after_shard:
                    start = after_entry
                else:
                    start = f"({after_entry}"
                pipe.xrange(prefix + "dead", start, "+", count=limit)
            pages: list[list[tuple[bytes, dict[bytes, bytes]]]] = list(await pipe.execute())
            entries = sorted(
                (
                    (_entry_order(as_str(position)), shard, as_str(position), as_str(fields[b"i"]))
                    for shard, page in enumerate(pages)
                    for position, fields in page
                ),
            )[:limit]
            if not entries:
                return []
            pipe = self._redis.pipeline(transaction=False)
            for _, shard, _, item_id in entries:
                pipe.hgetall(self._keys.work_item(self._queue, item_id, shard))
            records = await pipe.execute()
        found: list[DeadLetter] = []
        for (_, shard, position, item_id), record in zip(entries, records, strict=True):
            if not record:
                continue
            found.append(_dead_letter(item_id, _receipt(shard, position), record))
        return found

    async def redrive(self, item_id: str) -> bool:
        with redis_errors_as_unavailable():
            shard, (state,) = await self._find(item_id, ["st"])
            if state != b"dead":
                return False
            return bool(
                await self._runners[shard].run("redrive", args=[self._prefixes[shard], item_id])
            )

    async def stats(self) -> QueueStats:
        with redis_errors_as_unavailable():
            if self._shards == 1:
                counts = [await self._scripts.run("stats", args=[self._prefix])]
            else:
                counts = await self._on_shards("stats", [(s, []) for s in range(self._shards)])
        ready, leased, delayed, dead = (sum(int(c[i]) for c in counts) for i in range(4))
        return QueueStats(ready, leased, delayed, dead)

    async def get_dead(self, item_id: str) -> DeadLetter | None:
        with redis_errors_as_unavailable():
            shard, (state,) = await self._find(item_id, ["st"])
            if state != b"dead":
                return None
            record: dict[bytes, bytes] = await self._redis.hgetall(  # type: ignore[assignment]
                self._keys.work_item(self._queue, item_id, shard)
            )
        if record.get(b"st") != b"dead":
            return None
        return _dead_letter(item_id, _receipt(shard, as_str(record.get(b"x", b""))), record)

    async def depth(self, tenant_id: str | None = None) -> list[PriorityDepth]:
        with redis_errors_as_unavailable():
            if tenant_id is not None or self._shards == 1:
                # A tenant's items are all in its shard.
                shard = self.shard_of(tenant_id) if tenant_id is not None else 0
                flats = [
                    await self._runners[shard].run(
                        "depth", args=[self._prefixes[shard], tenant_id or ""]
                    )
                ]
            else:
                flats = await self._on_shards("depth", [(s, [""]) for s in range(self._shards)])
        found: dict[str, list[int]] = {}
        for flat in flats:
            for i in range(0, len(flat), 5):
                row = found.setdefault(as_str(flat[i]), [0, 0, 0, 0])
                for j, n in enumerate(flat[i + 1 : i + 5]):
                    row[j] += int(n)
        return [
            PriorityDepth(priority, *found.get(priority.value, [0, 0, 0, 0]))
            for priority in PRIORITY_ORDER
        ]

    async def aclose(self) -> None:
        await self._listener.aclose()

    def _where(self, item: WorkItem) -> tuple[int, str, str]:
        """A delivery's shard, stream and entry id, its receipt read once (a completion batch
        asks this of every item). The shard is the one the delivery came from (its receipt
        says; not the tenant's shard of today's shard count, which may have changed since)."""
        shard, entry = _split_receipt(item.receipt)
        if shard >= self._shards:
            raise ValueError(f"receipt of shard {shard} on a queue of {self._shards} shards")
        # A QueuePriority is a str of its value.
        return shard, work_stream_key(self._prefixes[shard], item.priority, item.tenant_id), entry

    @staticmethod
    def _items(consumer: str, values: bytes, lengths: bytes, shard: int) -> list[WorkItem]:
        """Decode the dequeue script's reply: nine fields per item back to back in ``values``,
        their lengths in ``lengths`` (4-byte big-endian each); the items came from ``shard``.
        Per item on the worker's hot path: the offsets come from one C call, the fields go
        to WorkItem by position, the priority from a dict (an Enum call costs more)."""
        at = list(accumulate(unpack(f">{len(lengths) // 4}I", lengths), initial=0))
        shard_tag = f"{shard}/" if shard else ""  # as _receipt
        priorities = _PRIORITIES
        items: list[WorkItem] = []
        append = items.append
        for i in range(0, len(at) - 1, 9):
            # id, entry, tenant, kind, priority, batch, payload, deliveries, enqueued_ms
            o0, o1, o2, o3, o4, o5, o6, o7, o8, o9 = at[i : i + 10]
            append(
                WorkItem(
                    values[o0:o1].decode(),  # item_id
                    values[o2:o3].decode(),  # tenant_id
                    values[o3:o4].decode(),  # kind
                    values[o6:o7],  # payload
                    priorities[values[o4:o5]],  # priority
                    values[o5:o6].decode() or None,  # batch_id
                    int(values[o7:o8]),  # deliveries
                    int(values[o8:o9]),  # enqueued_at_ms
                    consumer,
                    shard_tag + values[o1:o2].decode(),  # receipt
                )
            )
        return items


def _receipt(shard: int, entry: str) -> str:
    """A delivery's receipt (or a dead letter's position): the stream entry id, after its
    shard for shards other than 0 (so receipts of an unsharded queue stay what they were)."""
    return f"{shard}/{entry}" if shard else entry


def _split_receipt(receipt: str) -> tuple[int, str]:
    """The shard and entry id of a receipt or position (``_receipt``)."""
    shard, _, entry = receipt.rpartition("/")
    return (int(shard) if shard else 0), entry


def _entry_order(entry: str) -> tuple[int, int]:
    """A stream entry id as a sortable pair."""
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq or 0)


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

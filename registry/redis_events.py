"""Session event logs in Redis, and the pub/sub readers that feed every client stream of the
process (domain.ports.events.EventLog).

Events are appended by the job scripts to a per-session stream and published with SPUBLISH on
the session's shard channel (registry.keys: under the tenant's hash tag, the slot of the
script's keys) in the same atomic step. On a Redis Cluster a shard message stays on the
session's shard (no cluster-bus broadcast); a single Redis is one shard owning every slot, and
takes the same code path (Redis 7).

This process keeps one reader per shard node it follows sessions on: one pub/sub connection
with SSUBSCRIBE for the sessions whose slots the node owns, read by one task that hands each
message to the local fan-out. Subscribing is confirmed before ``subscribe()`` returns, so a
caller that reads the log afterwards misses nothing: older events are in the log, newer ones
arrive live.

One subscription per session serves every stream of the process following it, and it lingers
for ``linger_s`` after the last one ends (at most ``max_lingering`` sessions): a session's next
chat or stream within that time costs no SSUBSCRIBE round trip and no wait for its confirmation,
and a stream's end no SUNSUBSCRIBE. Expired ones are unsubscribed together.

Keeping the readers right (ADR 0015):

- A reader whose connection drops reconnects (with backoff), resubscribes the followed
  sessions of its node and, once each resubscription is confirmed, marks that session's feeds
  lagging so its streams re-read the log (nothing lost; streams skip what they already have).
- The layout (which master owns which slot; registry.shard_nodes) is read again after a lost
  connection, a ``sunsubscribe`` the server sent on its own (the slot moved away: resharding or
  failover), a silent reader, or a heartbeat that could not be sent; sessions whose slot moved
  are unsubscribed from the old node, subscribed on the new one and marked lagging.
- Heartbeats: every ``heartbeat_interval_s`` the process SPUBLISHes, through the stores' client
  (the path the job scripts' events take), on a channel of its own in a slot of each reader's
  node; the reader hears it back. A reader that hears none for ``heartbeat_timeout_s`` is
  silent: reported (``silent_readers``, the health entry "events"), its connection is replaced
  and the layout re-read, and it counts as recovered at the next heartbeat it hears.
- ``legacy_channels`` (a rolling upgrade from releases with classic pub/sub): each session is
  also SUBSCRIBEd on its classic channel, on the same connection; streams drop the duplicates
  by sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from domain.errors import Unavailable
from domain.jobs import EventPage
from domain.periodic import PeriodicTask
from registry.event_codec import decode_message, decode_stream_entry
from registry.fanout import Feed, LocalFanout
from registry.keys import KeySpace
from registry.redis_client import (
    RedisStore,
    as_str,
    cancel_and_wait,
    is_cluster,
    pairs_to_dict,
    redis_errors_as_unavailable,
)
from registry.shard_nodes import Layout, ShardNodes, SingleNode, slot_of, tag_in_slot

log = logging.getLogger(__name__)

_CONNECTION_ERRORS = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)
# What a pub/sub command may raise when its connection goes: redis-py drops a connection's
# writer when the connection is closed under a command in flight ("'NoneType' object has no
# attribute 'writelines'"): a lost connection, not a bug here.
_COMMAND_ERRORS = (*_CONNECTION_ERRORS, AttributeError)
_MAX_BACKOFF_S = 2.0


def _by_slot(channels: Iterable[str]) -> list[list[str]]:
    """``channels`` grouped by slot: one SSUBSCRIBE or SUNSUBSCRIBE names one slot's."""
    groups: dict[int, list[str]] = {}
    for channel in channels:
        groups.setdefault(slot_of(channel), []).append(channel)
    return list(groups.values())


class _Reader:
    """The pub/sub connection of one shard node and what it carries."""

    __slots__ = (
        "channels",
        "client",
        "heard",
        "heartbeat_channel",
        "lock",
        "node",
        "pubsub",
        "silent",
        "task",
        "unsubscribing",
    )

    def __init__(self, node: str, client: Redis, heartbeat_channel: str, now: float) -> None:
        self.node = node
        self.client = client
        self.heartbeat_channel = heartbeat_channel
        self.pubsub: PubSub | None = None
        # Session channels whose slot this node owns, subscribed (or to be, on connecting).
        self.channels: set[str] = set()
        # One (UN)SUBSCRIBE at a time: a fresh PubSub takes its connection on its first
        # command, and concurrent first commands would each take one.
        self.lock = asyncio.Lock()
        self.task: asyncio.Task[None] | None = None
        # Loop time of the last heartbeat heard (or of the connection's start).
        self.heard = now
        # No heartbeat heard for the timeout, none since.
        self.silent = False
        # SUNSUBSCRIBEs this process sent and whose replies are still due, by channel.
        self.unsubscribing: dict[str, int] = {}


class _Subscription:
    """``RedisEventLog.subscribe``'s context manager: a plain object rather than a generator,
    since every open stream holds one for its whole life (no generator frame, no entry in the
    loop's set of live async generators)."""

    __slots__ = ("_channel", "_feed", "_log")

    def __init__(self, log: RedisEventLog, feed: Feed) -> None:
        self._log = log
        self._feed = feed
        self._channel = ""

    async def __aenter__(self) -> Feed:
        self._channel = await self._log._follow(self._feed)
        return self._feed

    async def __aexit__(self, *exc_info: object) -> None:
        await self._log._unfollow(self._feed, self._channel)


class RedisEventLog(RedisStore):
    """domain.ports.events.EventLog on Redis streams and sharded pub/sub."""

    SCRIPTS = "events"

    def __init__(
        self,
        redis: Redis,
        subscriber: Redis | ShardNodes,
        keys: KeySpace,
        *,
        read_block_s: float = 5.0,
        subscribe_timeout_s: float = 5.0,
        linger_s: float = 10.0,
        max_lingering: int = 10_000,
        heartbeat_interval_s: float = 1.0,
        heartbeat_timeout_s: float = 5.0,
        legacy_channels: bool = False,
    ) -> None:
        """``redis`` serves log reads and sends the heartbeats; ``subscriber`` is the client
        reserved for the pub/sub connection of a single Redis (its socket timeout must exceed
        ``read_block_s``), or the nodes of a cluster (registry.shard_nodes.ClusterNodes). A
        session's subscription stays ``linger_s`` after its last stream ends (0: unsubscribed
        at once), for at most ``max_lingering`` sessions."""
        super().__init__(redis, keys)
        if isinstance(subscriber, Redis):
            if is_cluster(subscriber):
                raise TypeError("a cluster's event readers take registry.shard_nodes.ClusterNodes")
            subscriber = SingleNode(subscriber)
        self._nodes: ShardNodes = subscriber
        self._read_block_s = read_block_s
        self._subscribe_timeout_s = subscribe_timeout_s
        self._heartbeat_interval_s = heartbeat_interval_s
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._legacy = legacy_channels
        self.fanout = LocalFanout()
        # This process's heartbeats only: each process hears its own.
        self._process_id = uuid.uuid4().hex[:12]
        self._layout: Layout | None = None
        self._readers: dict[str, _Reader] = {}
        # Session channel -> the node whose reader carries it.
        self._route: dict[str, str] = {}
        # Channels with SSUBSCRIBE commands not yet confirmed, and who waits for them.
        self._unconfirmed: dict[str, int] = {}
        self._confirmed: dict[str, asyncio.Event] = {}
        # Channels (re)subscribed after a loss or a move: their feeds re-read the log once the
        # subscription is confirmed.
        self._lag_on_confirm: set[str] = set()
        # Followed channels a node dropped on its own (their slot moved): placed again by the
        # next layout.
        self._moved: set[str] = set()
        self._layout_lock = asyncio.Lock()
        self._resync_wanted = asyncio.Event()
        self._resyncer: asyncio.Task[None] | None = None
        self._heartbeat: PeriodicTask | None = None
        self._closing = False
        # Confirmed subscriptions no stream follows any more, oldest first: channel -> the
        # loop time it expires. A channel is here only while no feed of its session exists.
        self._linger_s = linger_s
        self._max_lingering = max_lingering
        self._lingering: OrderedDict[str, float] = OrderedDict()
        self._sweeper: asyncio.Task[None] | None = None
        # Readers declared silent since the start (a counter for tests and logs).
        self.silences = 0

    # -- reading ---------------------------------------------------------------------------

    async def read_after(
        self, tenant_id: str, session_id: str, after: int, *, limit: int
    ) -> EventPage:
        keys = self._keys
        with redis_errors_as_unavailable():
            last, oldest, entries = await self._scripts.run(
                "read_after",
                keys=[
                    keys.session_event_seq(tenant_id, session_id),
                    keys.session_events(tenant_id, session_id),
                ],
                args=[max(after, 0), limit],
            )
        events = [
            decode_stream_entry(
                session_id,
                as_str(entry_id),
                {as_str(k): as_str(v) for k, v in pairs_to_dict(fields).items()},
            )
            for entry_id, fields in entries
        ]
        oldest_seq = int(as_str(oldest).split("-", 1)[0]) if oldest else None
        return EventPage(events, oldest_seq, int(last))

    # -- following -------------------------------------------------------------------------

    def subscribe(self, tenant_id: str, session_id: str) -> _Subscription:
        return _Subscription(self, Feed((tenant_id, session_id)))

    async def _follow(self, feed: Feed) -> str:
        """Start carrying ``feed``'s session (if no other stream does): its channel, once the
        subscription is in effect."""
        channel = self._keys.session_channel(*feed.key)
        first = self.fanout.add(feed)
        try:
            # A lingering subscription is still in effect (confirmed, never unsubscribed).
            if first and self._lingering.pop(channel, None) is None:
                await self._subscribe(channel)
            await self._wait_confirmed(channel)
        except BaseException:
            await self._unfollow(feed, channel)
            raise
        return channel

    async def _unfollow(self, feed: Feed, channel: str) -> None:
        if self.fanout.remove(feed):
            await self._release(channel)

    def _followed(self, channel: str) -> bool:
        key = self._keys.parse_session_channel(channel)
        return key is not None and self.fanout.has(key)

    async def _release(self, channel: str) -> None:
        """The last stream of the channel's session ended: keep its subscription a while if
        it is confirmed and its reader is connected, else unsubscribe now."""
        overflow: list[str] = []
        reader = self._readers.get(self._route.get(channel, ""))
        if (
            self._linger_s > 0
            and reader is not None
            and reader.pubsub is not None
            and not self._closing
            and channel not in self._confirmed
        ):
            loop = asyncio.get_running_loop()
            self._lingering[channel] = loop.time() + self._linger_s
            while len(self._lingering) > self._max_lingering:
                overflow.append(self._lingering.popitem(last=False)[0])
            if self._sweeper is None:
                self._sweeper = loop.create_task(self._sweep(), name="event-log-unsubscriber")
        else:
            overflow.append(channel)
        if overflow:
            await self._unsubscribe(overflow)

    async def _unsubscribe(self, channels: list[str]) -> None:
        """Stop carrying ``channels`` (sessions no stream of this process follows)."""
        await self._send_unsubscribes(self._unroute(channels))

    def _unroute(self, channels: list[str]) -> dict[str, list[str]]:
        """Take ``channels`` off the readers that carry them: those each carried, by node."""
        by_node: dict[str, list[str]] = {}
        for channel in channels:
            node = self._route.pop(channel, None)
            reader = self._readers.get(node) if node is not None else None
            if reader is not None:
                reader.channels.discard(channel)
                by_node.setdefault(reader.node, []).append(channel)
        return by_node

    async def _send_unsubscribes(self, by_node: dict[str, list[str]]) -> None:
        for node, dropped in by_node.items():
            reader = self._readers.get(node)
            if reader is not None:
                await self._send_unsubscribe(reader, dropped)

    async def _send_unsubscribe(self, reader: _Reader, channels: list[str]) -> None:
        """SUNSUBSCRIBE ``channels`` on ``reader``'s connection, if it has one (a reconnecting
        reader subscribes only what it carries); a lost connection settles it as well."""
        pubsub = reader.pubsub
        if pubsub is None:
            return
        with contextlib.suppress(*_COMMAND_ERRORS):
            async with reader.lock:
                if reader.pubsub is not pubsub:
                    return
                for group in _by_slot(channels):
                    for channel in group:
                        reader.unsubscribing[channel] = reader.unsubscribing.get(channel, 0) + 1
                    await pubsub.sunsubscribe(*group)
                if self._legacy:
                    await pubsub.unsubscribe(*self._legacy_channels(channels))

    def _legacy_channels(self, channels: Iterable[str]) -> list[str]:
        found = []
        for channel in channels:
            key = self._keys.parse_session_channel(channel)
            if key is not None:
                found.append(self._keys.legacy_session_channel(*key))
        return found

    async def _sweep(self) -> None:
        """Unsubscribe the lingering subscriptions as they expire (one command per node and
        slot for all those due together); ends when none is left."""
        loop = asyncio.get_running_loop()
        try:
            while self._lingering:
                expires = next(iter(self._lingering.values()))
                await asyncio.sleep(max(expires - loop.time(), 0.0) + 0.05)
                now = loop.time()
                due: list[str] = []
                for channel, expires in self._lingering.items():
                    if expires > now:
                        break
                    due.append(channel)
                for channel in due:
                    del self._lingering[channel]
                if due:
                    await self._unsubscribe(due)
        finally:
            self._sweeper = None

    async def _subscribe(self, channel: str) -> None:
        self._start()
        reader = await self._reader_of(channel)
        self._confirmed.setdefault(channel, asyncio.Event())
        self._route[channel] = reader.node
        reader.channels.add(channel)
        try:
            async with reader.lock:
                pubsub = reader.pubsub
                if pubsub is None:  # the reader is (re)connecting: it subscribes its channels
                    return
                self._unconfirmed[channel] = self._unconfirmed.get(channel, 0) + 1
                await self._send_subscribe(pubsub, [channel])
        except _CONNECTION_ERRORS as exc:
            raise Unavailable(f"redis unavailable: {exc}") from exc
        except AttributeError as exc:  # see _COMMAND_ERRORS
            raise Unavailable(f"redis connection closed: {exc}") from exc

    async def _send_subscribe(self, pubsub: PubSub, channels: list[str]) -> None:
        """SSUBSCRIBE ``channels`` (one command per slot); with legacy channels, their classic
        channels first, so that the SSUBSCRIBE's confirmation covers both."""
        if self._legacy:
            await pubsub.subscribe(*self._legacy_channels(channels))
        for group in _by_slot(channels):
            await pubsub.ssubscribe(*group)

    async def _wait_confirmed(self, channel: str) -> None:
        confirmed = self._confirmed.get(channel)
        if confirmed is None:
            return
        try:
            async with asyncio.timeout(self._subscribe_timeout_s):
                await confirmed.wait()
        except TimeoutError:
            raise Unavailable("redis did not confirm the event subscription") from None

    @property
    def lingering(self) -> int:
        """Subscriptions kept for sessions no stream of this process follows now."""
        return len(self._lingering)

    async def lingering_dropped(self) -> None:
        """Wait until every lingering subscription has been dropped (as they expire)."""
        sweeper = self._sweeper
        if sweeper is not None:
            await asyncio.shield(sweeper)

    @property
    def awaiting_confirmation(self) -> int:
        """Channels whose SSUBSCRIBE this process still waits to see confirmed."""
        return len(self._confirmed)

    # -- readers ---------------------------------------------------------------------------

    def _start(self) -> None:
        if self._closing:
            raise Unavailable("the event log is closed")
        if self._heartbeat is None:
            self._heartbeat = PeriodicTask(
                "event-log-heartbeat",
                self._beat_once,
                self._heartbeat_interval_s,
                wait_first=True,
            )
            self._heartbeat.start()
            self._resyncer = asyncio.create_task(self._resync_loop(), name="event-log-layout")

    async def _current_layout(self) -> Layout:
        layout = self._layout
        if layout is None:
            async with self._layout_lock:
                layout = self._layout
                if layout is None:
                    layout = self._layout = await self._nodes.layout()
        return layout

    async def _reader_of(self, channel: str) -> _Reader:
        layout = await self._current_layout()
        node = layout.node_of(slot_of(channel))
        if node is None:
            self._want_resync()
            raise Unavailable("no Redis master serves the session's slot now")
        return self._reader(node, layout)

    def _heartbeat_channel(self, node: str, layout: Layout) -> str | None:
        slot = layout.first_slot(node)
        if slot is None:
            return None
        return self._keys.event_heartbeat_channel(tag_in_slot(slot), self._process_id)

    def _reader(self, node: str, layout: Layout) -> _Reader:
        reader = self._readers.get(node)
        if reader is None:
            heartbeat = self._heartbeat_channel(node, layout)
            assert heartbeat is not None  # node comes from the layout's owners
            loop = asyncio.get_running_loop()
            reader = _Reader(node, self._nodes.client(node), heartbeat, loop.time())
            self._readers[node] = reader
            reader.task = loop.create_task(self._read(reader), name=f"event-reader {node}")
        return reader

    async def _read(self, reader: _Reader) -> None:
        backoff = 0.05
        while not self._closing and self._readers.get(reader.node) is reader:
            try:
                pubsub = reader.pubsub
                if pubsub is None:
                    pubsub = await self._connect(reader)
                    backoff = 0.05
                message = await pubsub.get_message(timeout=self._read_block_s)
                if message is not None:
                    self._handle(reader, message)
            except asyncio.CancelledError:
                raise
            except _CONNECTION_ERRORS as exc:
                log.warning("event subscription on %s lost (%s); reconnecting", reader.node, exc)
                await self._drop(reader)
                self._want_resync()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
            except redis_errors.ResponseError as exc:
                # MOVED for a slot the node gave away before this process saw the new layout.
                log.warning(
                    "%s refused an event subscription (%s); reading the layout again",
                    reader.node,
                    exc,
                )
                await self._drop(reader)
                self._want_resync()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
            except Exception:
                log.exception("event reader of %s failed; reconnecting", reader.node)
                await self._drop(reader)
                self._want_resync()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)

    async def _connect(self, reader: _Reader) -> PubSub:
        """A new connection for ``reader``: its heartbeat channel and every followed session
        of its node subscribed, each session marked lagging once confirmed."""
        pubsub = reader.client.pubsub()
        async with reader.lock:
            followed = {c for c in reader.channels if self._followed(c)}
            for channel in reader.channels - followed:  # lingering: not resubscribed
                self._lingering.pop(channel, None)
                self._route.pop(channel, None)
            reader.channels = followed
            # Confirmations due on the old connection will not come; waits of sessions no
            # longer followed end.
            for channel in list(self._confirmed):
                if channel not in followed and self._route.get(channel) in (None, reader.node):
                    self._confirmed.pop(channel, None)
                    self._unconfirmed.pop(channel, None)
                    self._lag_on_confirm.discard(channel)
            for channel in followed:
                self._unconfirmed[channel] = 1
                self._confirmed.setdefault(channel, asyncio.Event())
                self._lag_on_confirm.add(channel)
            reader.unsubscribing.clear()
            try:
                await pubsub.ssubscribe(reader.heartbeat_channel)
                if followed:
                    await self._send_subscribe(pubsub, sorted(followed))
            except BaseException:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                raise
            reader.pubsub = pubsub
            reader.heard = asyncio.get_running_loop().time()
        log.info("event subscription on %s restored (%d sessions)", reader.node, len(followed))
        return pubsub

    async def _drop(self, reader: _Reader) -> None:
        pubsub, reader.pubsub = reader.pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                # A stopped node may never answer the close: bounded. (asyncio.timeout, not
                # wait_for: Python 3.11's wait_for can lose a cancellation that lands as its
                # awaitable finishes, and a stream being cancelled then hangs.)
                async with asyncio.timeout(self._heartbeat_interval_s):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _restart(self, reader: _Reader) -> None:
        """Replace ``reader``'s connection (it is silent) and its task."""
        await cancel_and_wait(reader.task)
        await self._drop(reader)
        if self._readers.get(reader.node) is reader and not self._closing:
            reader.task = asyncio.get_running_loop().create_task(
                self._read(reader), name=f"event-reader {reader.node}"
            )

    async def _retire(self, reader: _Reader) -> None:
        """``reader``'s node is no master any more and carries nothing."""
        if self._readers.get(reader.node) is reader:
            del self._readers[reader.node]
        await cancel_and_wait(reader.task)
        reader.task = None
        await self._drop(reader)

    def _handle(self, reader: _Reader, message: dict[str, Any]) -> None:
        kind = as_str(message["type"])
        channel = as_str(message["channel"])
        if kind == "smessage" or kind == "message":
            if channel == reader.heartbeat_channel:
                self._heard(reader)
                return
            key = self._keys.parse_session_channel(channel)
            if key is None or not self.fanout.has(key):
                return
            try:
                event = decode_message(key[1], as_str(message["data"]))
            except ValueError:  # no sequence: followers find the gap at the next event
                log.warning("session %s: unreadable event message ignored", key[1])
                return
            if event is None:
                self.fanout.close_session(key)
            else:
                self.fanout.deliver(key, event)
        elif kind == "ssubscribe":
            left = self._unconfirmed.get(channel, 0) - 1
            if left > 0:
                self._unconfirmed[channel] = left
                return
            self._unconfirmed.pop(channel, None)
            confirmed = self._confirmed.pop(channel, None)
            if confirmed is not None:
                confirmed.set()
            if channel in self._lag_on_confirm:
                self._lag_on_confirm.discard(channel)
                key = self._keys.parse_session_channel(channel)
                if key is not None:
                    self.fanout.mark_session_lagging(key)
        elif kind == "sunsubscribe":
            pending = reader.unsubscribing.get(channel, 0)
            if pending > 1:
                reader.unsubscribing[channel] = pending - 1
            elif pending == 1:
                del reader.unsubscribing[channel]
            elif channel in reader.channels or channel == reader.heartbeat_channel:
                # The server dropped it: its slot left the node (resharding, failover).
                log.info("%s dropped event subscriptions (slot moved); re-routing", reader.node)
                reader.channels.discard(channel)
                self._route.pop(channel, None)
                self._lingering.pop(channel, None)
                if channel != reader.heartbeat_channel and self._followed(channel):
                    self._moved.add(channel)
                self._want_resync()

    def _heard(self, reader: _Reader) -> None:
        reader.heard = asyncio.get_running_loop().time()
        if reader.silent:
            reader.silent = False
            log.warning("event reader of %s hears its heartbeats again", reader.node)

    # -- layout changes --------------------------------------------------------------------

    def _want_resync(self) -> None:
        self._resync_wanted.set()

    async def _resync_loop(self) -> None:
        """Read the layout again whenever something suggests it changed, and move the
        sessions whose slot changed owner (one pass at a time, retried until it succeeds)."""
        backoff = 0.05
        while not self._closing:
            await self._resync_wanted.wait()
            self._resync_wanted.clear()
            try:
                layout = await self._nodes.layout()
                await self._apply(layout)
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Unavailable as exc:
                log.warning("cannot read the Redis layout for the event readers: %s", exc)
                self._resync_wanted.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
            except Exception:
                log.exception("re-routing the event subscriptions failed; retrying")
                self._resync_wanted.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)

    async def _apply(self, layout: Layout) -> None:
        """Route every carried session to the owner of its slot in ``layout``."""
        self._layout = layout
        # Heartbeat channels follow their nodes' slots.
        for reader in list(self._readers.values()):
            heartbeat = self._heartbeat_channel(reader.node, layout)
            if heartbeat is not None and heartbeat != reader.heartbeat_channel:
                old, reader.heartbeat_channel = reader.heartbeat_channel, heartbeat
                await self._move_heartbeat(reader, old)
        moves: dict[str, list[str]] = {}
        unowned = False
        for channel in [*self._route, *self._moved]:
            target = layout.node_of(slot_of(channel))
            if target is None:
                unowned = True
                continue
            if self._route.get(channel) != target:
                moves.setdefault(target, []).append(channel)
        self._moved.clear()
        for target, channels in moves.items():
            await self._move(channels, target, layout)
        for reader in list(self._readers.values()):
            if not reader.channels and layout.first_slot(reader.node) is None:
                await self._retire(reader)
        if unowned:  # slots without a master now: look again shortly
            await asyncio.sleep(self._heartbeat_interval_s)
            self._want_resync()

    async def _move_heartbeat(self, reader: _Reader, old: str) -> None:
        pubsub = reader.pubsub
        if pubsub is None:
            return  # connecting subscribes the new one
        with contextlib.suppress(*_COMMAND_ERRORS):
            async with reader.lock:
                if reader.pubsub is pubsub:
                    reader.unsubscribing[old] = reader.unsubscribing.get(old, 0) + 1
                    await pubsub.sunsubscribe(old)
                    await pubsub.ssubscribe(reader.heartbeat_channel)

    async def _move(self, channels: list[str], target: str, layout: Layout) -> None:
        """Carry ``channels`` on ``target``'s reader from now on; their sessions re-read the
        log once subscribed there. Lingering ones are dropped instead."""
        by_node = self._unroute(channels)
        moving: list[str] = []
        for channel in channels:
            if self._followed(channel):
                moving.append(channel)
            else:
                self._lingering.pop(channel, None)
        await self._send_unsubscribes(by_node)
        if not moving:
            return
        reader = self._reader(target, layout)
        log.info("%d event subscriptions move to %s", len(moving), target)
        for channel in moving:
            self._route[channel] = target
            reader.channels.add(channel)
            self._confirmed.setdefault(channel, asyncio.Event())
            self._lag_on_confirm.add(channel)
        with contextlib.suppress(*_COMMAND_ERRORS):
            async with reader.lock:
                pubsub = reader.pubsub
                if pubsub is None:
                    return  # connecting subscribes them
                for channel in moving:
                    self._unconfirmed[channel] = self._unconfirmed.get(channel, 0) + 1
                await self._send_subscribe(pubsub, moving)

    # -- heartbeats ------------------------------------------------------------------------

    async def _beat_once(self) -> None:
        """A heartbeat to each connected reader, then a look for silent ones (every interval,
        run by domain.periodic, which outlives any one round's failure)."""
        readers = [r for r in self._readers.values() if r.pubsub is not None]
        if readers:
            await asyncio.gather(*(self._send_heartbeat(r) for r in readers))
        now = asyncio.get_running_loop().time()
        for reader in list(self._readers.values()):
            if now - reader.heard <= self._heartbeat_timeout_s:
                continue
            if not reader.silent:
                reader.silent = True
                self.silences += 1
            log.warning(
                "event reader of %s heard no heartbeat for %.1f s: reconnecting it and "
                "reading the layout again (health entry events NOT_SERVING)",
                reader.node,
                now - reader.heard,
            )
            # The next attempt after another timeout.
            reader.heard = now
            self._want_resync()
            await self._restart(reader)

    async def _send_heartbeat(self, reader: _Reader) -> None:
        """SPUBLISH on the reader's heartbeat channel through the stores' client, routed as
        the job scripts' events are. A failure is only logged: the reader's silence is what
        counts (and a lost master shows there too)."""
        try:
            async with asyncio.timeout(max(self._heartbeat_interval_s, 0.1)):
                await self._redis.execute_command(  # type: ignore[no-untyped-call]
                    "SPUBLISH", reader.heartbeat_channel, "1"
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Whatever the client raises (a redis error, a timeout, a connection closed under
            # the call: uvloop's RuntimeError), the heartbeats go on; the reader's silence is
            # what is reported.
            log.debug("event heartbeat to %s not sent: %r", reader.node, exc)
            self._want_resync()

    def silent_readers(self) -> list[str]:
        """The nodes whose event reader heard no heartbeat for the timeout (and none since):
        streams of this process following sessions there miss live events until it recovers
        (then they catch up from the log)."""
        now = asyncio.get_running_loop().time()
        return sorted(
            reader.node
            for reader in self._readers.values()
            if reader.silent or now - reader.heard > self._heartbeat_timeout_s
        )

    def readers_problem(self) -> str | None:
        """What is wrong with the event readers, for health; None when all hear heartbeats."""
        silent = self.silent_readers()
        if not silent:
            return None
        return (
            f"event reader of {', '.join(silent)} heard no heartbeat for "
            f"{self._heartbeat_timeout_s:g} s: live events are late until it recovers"
        )

    async def aclose(self) -> None:
        self._closing = True
        if self._heartbeat is not None:
            await self._heartbeat.stop()
            self._heartbeat = None
        await cancel_and_wait(self._resyncer)
        self._resyncer = None
        await cancel_and_wait(self._sweeper)
        self._sweeper = None
        for reader in list(self._readers.values()):
            await self._retire(reader)
        self._lingering.clear()
        await self._nodes.aclose()

"""Session event logs in Redis, and the one pub/sub reader per process that feeds every client
stream of the process (domain.ports.events.EventLog).

Events are appended by the job scripts to a per-session stream and published on a per-session
channel in the same atomic step. This process subscribes (on one dedicated connection) to the
channels of the sessions its clients follow, and the reader task hands each message to the local
fan-out. Subscribing is confirmed before ``subscribe()`` returns, so a caller that reads the log
afterwards misses nothing: older events are in the log, newer ones arrive live.

One subscription per session serves every stream of the process following it, and it lingers
for ``linger_s`` after the last one ends (at most ``max_lingering`` sessions): a session's next
chat or stream within that time costs no SUBSCRIBE round trip and no wait for its confirmation,
and a stream's end no UNSUBSCRIBE. Expired ones are unsubscribed together, in one command.

The reader's connection has no retries of its own: when it drops, the reader reconnects,
resubscribes and marks every feed lagging, so streams re-read what they may have missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from domain.errors import Unavailable
from domain.jobs import EventPage
from registry.event_codec import decode_message, decode_stream_entry
from registry.fanout import Feed, LocalFanout
from registry.keys import KeySpace
from registry.redis_client import (
    RedisStore,
    as_str,
    cancel_and_wait,
    pairs_to_dict,
    redis_errors_as_unavailable,
)

log = logging.getLogger(__name__)

_CONNECTION_ERRORS = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)


class RedisEventLog(RedisStore):
    """domain.ports.events.EventLog on Redis streams and pub/sub."""

    SCRIPTS = "events"

    def __init__(
        self,
        redis: Redis,
        subscriber: Redis,
        keys: KeySpace,
        *,
        read_block_s: float = 5.0,
        subscribe_timeout_s: float = 5.0,
        linger_s: float = 10.0,
        max_lingering: int = 10_000,
    ) -> None:
        """``redis`` serves log reads; ``subscriber`` is a client reserved for the pub/sub
        connection (its socket timeout must exceed ``read_block_s``). A session's subscription
        stays ``linger_s`` after its last stream ends (0: unsubscribed at once), for at most
        ``max_lingering`` sessions."""
        super().__init__(redis, keys)
        self._subscriber = subscriber
        self._read_block_s = read_block_s
        self._subscribe_timeout_s = subscribe_timeout_s
        self.fanout = LocalFanout()
        self._pubsub: PubSub | None = None
        # Channels with SUBSCRIBE commands not yet confirmed, and who waits for them.
        self._unconfirmed: dict[str, int] = {}
        self._confirmed: dict[str, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None
        self._has_channels = asyncio.Event()
        # One (UN)SUBSCRIBE at a time: a fresh PubSub takes its connection from the pool on
        # its first command, and concurrent first commands would each take one (leaking them,
        # exhausting the pool and losing the confirmations sent on the extra connections).
        self._command_lock = asyncio.Lock()
        self._closing = False
        # Confirmed subscriptions no stream follows any more, oldest first: channel -> the
        # loop time it expires. A channel is here only while no feed of its session exists.
        self._linger_s = linger_s
        self._max_lingering = max_lingering
        self._lingering: OrderedDict[str, float] = OrderedDict()
        self._sweeper: asyncio.Task[None] | None = None

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

    @contextlib.asynccontextmanager
    async def subscribe(self, tenant_id: str, session_id: str) -> AsyncIterator[Feed]:
        feed = Feed((tenant_id, session_id))
        channel = self._keys.session_channel(tenant_id, session_id)
        first = self.fanout.add(feed)
        try:
            # A lingering subscription is still in effect (confirmed, never unsubscribed).
            if first and self._lingering.pop(channel, None) is None:
                await self._send("SUBSCRIBE", channel)
            await self._wait_confirmed(channel)
            yield feed
        finally:
            if self.fanout.remove(feed):
                await self._release(channel)

    async def _release(self, channel: str) -> None:
        """The last stream of the channel's session ended: keep its subscription a while if
        it is confirmed and the reader is connected, else unsubscribe now."""
        overflow: list[str] = []
        if (
            self._linger_s > 0
            and self._pubsub is not None
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
        pubsub = self._pubsub
        if pubsub is None:  # the reader is reconnecting; it subscribes only followed sessions
            return
        # AttributeError: redis-py drops a connection's writer when the connection is closed
        # under a command in flight; like a lost connection, the reader's reconnect settles it.
        with contextlib.suppress(*_CONNECTION_ERRORS, AttributeError):
            async with self._command_lock:
                await pubsub.unsubscribe(*channels)

    async def _sweep(self) -> None:
        """Unsubscribe the lingering subscriptions as they expire (one command for all those
        due together); ends when none is left."""
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

    async def _send(self, command: str, channel: str) -> None:
        self._ensure_reader()
        if command == "SUBSCRIBE":
            self._unconfirmed[channel] = self._unconfirmed.get(channel, 0) + 1
            self._confirmed.setdefault(channel, asyncio.Event())
        pubsub = self._pubsub
        if pubsub is None:  # the reader is reconnecting; it subscribes every followed session
            return
        try:
            async with self._command_lock:
                if command == "SUBSCRIBE":
                    await pubsub.subscribe(channel)
                    self._has_channels.set()
                else:
                    await pubsub.unsubscribe(channel)
        except _CONNECTION_ERRORS as exc:
            raise Unavailable(f"redis unavailable: {exc}") from exc
        except AttributeError as exc:
            # redis-py drops a connection's writer when the connection is closed under a
            # command in flight (the reader reconnecting, the process stopping): "'NoneType'
            # object has no attribute 'writelines'". That is a lost connection, not a bug here.
            raise Unavailable(f"redis connection closed: {exc}") from exc

    async def _wait_confirmed(self, channel: str) -> None:
        confirmed = self._confirmed.get(channel)
        if confirmed is None:
            return
        try:
            await asyncio.wait_for(confirmed.wait(), self._subscribe_timeout_s)
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
        """Channels whose SUBSCRIBE this process still waits to see confirmed."""
        return len(self._confirmed)

    def _ensure_reader(self) -> None:
        if self._task is None and not self._closing:
            self._pubsub = self._new_pubsub()
            self._task = asyncio.create_task(self._run(), name="event-log-reader")

    def _new_pubsub(self) -> PubSub:
        return self._subscriber.pubsub()

    async def _run(self) -> None:
        backoff = 0.05
        while not self._closing:
            try:
                if self._pubsub is None:
                    await self._reconnect()
                    backoff = 0.05
                await self._has_channels.wait()
                assert self._pubsub is not None
                message = await self._pubsub.get_message(timeout=self._read_block_s)
                if message is not None:
                    self._handle(message)
            except asyncio.CancelledError:
                raise
            except _CONNECTION_ERRORS as exc:
                log.warning("event subscription lost (%s); reconnecting", exc)
                await self._drop_pubsub()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except Exception:
                log.exception("event reader failed; reconnecting")
                await self._drop_pubsub()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        self._has_channels.clear()
        # The next connection subscribes only followed sessions.
        self._lingering.clear()
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _reconnect(self) -> None:
        """Resubscribe every followed session, then tell every feed to re-read the log."""
        pubsub = self._new_pubsub()
        channels = [self._keys.session_channel(t, s) for t, s in self.fanout.sessions()]
        # Only followed sessions are waited for (a follower waits while its feed is registered);
        # entries of subscriptions tried while Redis was away, whose followers have gone, go.
        self._unconfirmed = dict.fromkeys(channels, 1)
        self._confirmed = {c: self._confirmed.get(c) or asyncio.Event() for c in channels}
        if channels:
            await pubsub.subscribe(*channels)
            self._has_channels.set()
        self._pubsub = pubsub
        log.info("event subscription restored (%d sessions)", len(channels))
        self.fanout.mark_all_lagging()

    def _handle(self, message: dict[str, Any]) -> None:
        kind = as_str(message["type"])
        channel = as_str(message["channel"])
        if kind == "message":
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
        elif kind == "subscribe":
            left = self._unconfirmed.get(channel, 0) - 1
            if left > 0:
                self._unconfirmed[channel] = left
                return
            self._unconfirmed.pop(channel, None)
            confirmed = self._confirmed.pop(channel, None)
            if confirmed is not None:
                confirmed.set()

    async def aclose(self) -> None:
        self._closing = True
        await cancel_and_wait(self._task)
        self._task = None
        await cancel_and_wait(self._sweeper)
        self._sweeper = None
        await self._drop_pubsub()
        await self._subscriber.aclose()

"""Ending the open streams of a revoked API key, on every replica.

A unary call checks its key on every call, so a revocation stops it at once; a stream checks
its key when it opens and may then stay open for hours. Each process therefore keeps its open
streaming calls by key id (``OpenStreams``; server.edge registers each one once its caller is
known), and ``RevocationWatch`` reads, every ``interval_s``, which of those key ids are revoked:
one batched read of the store for the distinct key ids with something open, nothing at all while
no stream is open, and no per-stream cost while streams idle. The streams of a revoked key end
with UNAUTHENTICATED "API key revoked".

How a stream is ended: the edge's wrapper marks whether its call is running inside the servicer
(``OpenStream.inside``) or suspended in grpc while a message is sent. Inside, the watch cancels
the call's task and the wrapper turns that cancellation into the status; otherwise the wrapper
sees the mark when grpc hands control back, before it asks the servicer for the next message.
"""

from __future__ import annotations

import asyncio
import logging
import time

from domain.api_keys import ApiKeyManager
from domain.errors import Unauthenticated, Unavailable
from domain.periodic import PeriodicTask
from server.log_sampling import Sampler

log = logging.getLogger(__name__)

REVOKED_MESSAGE = "API key revoked"
# At most one "key store unavailable" warning per this many seconds.
_WARN_EVERY_S = 30.0


def revoked_error() -> Unauthenticated:
    return Unauthenticated(REVOKED_MESSAGE)


class OpenStream:
    """One open streaming call of a key: its task, whether it is running inside the servicer,
    and whether its key was found revoked."""

    __slots__ = ("inside", "key_id", "revoked", "task")

    def __init__(self, key_id: str, task: asyncio.Task[object] | None) -> None:
        self.key_id = key_id
        self.task = task
        self.inside = False
        self.revoked = False

    def end(self) -> None:
        """Mark revoked; cancel the task when it is inside the servicer (see module doc)."""
        self.revoked = True
        if self.inside and self.task is not None and not self.task.done():
            self.task.cancel()


class OpenStreams:
    """The process's open streaming calls by API key id."""

    def __init__(self) -> None:
        self._by_key: dict[str, set[OpenStream]] = {}

    def open(self, key_id: str) -> OpenStream:
        stream = OpenStream(key_id, asyncio.current_task())
        self._by_key.setdefault(key_id, set()).add(stream)
        return stream

    def close(self, stream: OpenStream) -> None:
        streams = self._by_key.get(stream.key_id)
        if streams is not None:
            streams.discard(stream)
            if not streams:
                del self._by_key[stream.key_id]

    def key_ids(self) -> list[str]:
        return list(self._by_key)

    def count(self) -> int:
        return sum(len(streams) for streams in self._by_key.values())

    def sending(self) -> int:
        """How many open streams are suspended while a message is sent to their client (one
        that stays so has a client that stopped reading: flow control holds the write)."""
        return sum(not s.inside for streams in self._by_key.values() for s in streams)

    def end_key(self, key_id: str) -> int:
        """End every open stream of ``key_id``; returns how many."""
        streams = self._by_key.pop(key_id, set())
        for stream in streams:
            stream.end()
        return len(streams)


class RevocationWatch(PeriodicTask):
    """Every ``interval_s``, ends the open streams of keys revoked since (see module doc);
    domain.periodic runs the loop. An interval of 0 turns the watch off."""

    def __init__(self, streams: OpenStreams, keys: ApiKeyManager, *, interval_s: float) -> None:
        super().__init__("revocation-watch", self.check_once, interval_s, wait_first=True)
        self.streams = streams
        self._keys = keys
        self._enabled = interval_s > 0
        self._warnings = Sampler(_WARN_EVERY_S)

    def start(self) -> None:
        if self._enabled:
            super().start()

    async def check_once(self) -> int:
        """One pass; returns how many streams it ended."""
        key_ids = self.streams.key_ids()
        if not key_ids:
            return 0
        try:
            revoked = await self._keys.revoked_among(key_ids)
        except Unavailable as exc:
            if self._warnings.due(time.monotonic()):
                log.warning("cannot check open streams for revoked keys: %s", exc)
            return 0
        ended = 0
        for key_id in revoked:
            count = self.streams.end_key(key_id)
            if count:
                log.info("API key %s is revoked: ending its %d open stream(s)", key_id, count)
            ended += count
        return ended

"""Noticing that the storage backend lost its data, and saying at start when it would.

A Redis restarted without persistence (or flushed) comes back empty: API keys, sessions, jobs,
batches and queued work are gone while every call still reaches it, so health alone says
nothing. Every replica therefore keeps the backend's instance marker (a random id stored once,
registry.keys.KeySpace.instance_marker) and checks it on each health probe with one
``SET NX GET``: a marker that is missing (re-created by this replica in the same command) or
differs from the one this replica knew (re-created by another replica) means the data is gone.
Replicas never overwrite a marker, so two of them cannot fight over it: the first to notice
writes a new one and the others adopt it.

On a loss the watch logs an ERROR, re-seeds what start-up seeds (server.key_seeding: the
bootstrap admin key) and wakes every client stream of the process, whose follow then checks
that its session and job still exist and ends with ABORTED when they do not (domain.chat).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Protocol

from redis import exceptions as redis_errors

from registry.backend import Persistence

log = logging.getLogger(__name__)


class MarkedBackend(Protocol):
    """What the watch needs of registry.backend.Backend.instance."""

    name: str

    async def ping(self) -> None: ...

    async def instance_marker(self, candidate: str) -> str: ...

    async def persistence(self) -> Persistence: ...

    def masters(self) -> frozenset[str] | None: ...


class DataLossWatch:
    """The health probe (ping, the cluster's masters, the instance marker); ``on_lost`` runs
    once per loss, ``on_failover`` once per change of a cluster's masters."""

    def __init__(
        self,
        backend: MarkedBackend,
        on_lost: Callable[[], Awaitable[None]],
        on_failover: Callable[[], None] | None = None,
    ) -> None:
        self._backend = backend
        self._on_lost = on_lost
        self._on_failover = on_failover
        self._known: str | None = None
        self._masters: frozenset[str] | None = None
        self.failovers = 0
        self._refused_logged = False
        self.losses = 0
        self.lost = asyncio.Event()  # set once a loss was handled (for tests and tools)

    async def probe(self) -> None:
        """Raises domain.errors.Unavailable when the backend cannot be reached."""
        await self._backend.ping()
        self._check_masters()
        try:
            marker = await self._backend.instance_marker(uuid.uuid4().hex)
        except redis_errors.ResponseError as exc:  # read-only replica, out of memory, ACL
            if not self._refused_logged:
                log.warning("cannot check the Redis instance marker (%s): losses go unseen", exc)
                self._refused_logged = True
            return
        known = self._known
        if known is None or marker == known:
            self._known = marker
            return
        log.error(
            "Redis lost its data (instance marker %s is gone, now %s): it restarted without "
            "persistence or was flushed. Every API key, session, job, batch and queued item "
            "stored before is lost; streams of vanished jobs end with ABORTED; re-seeding the "
            "bootstrap admin key. Run Redis with appendonly yes (README, Operations).",
            known,
            marker,
        )
        # Adopted only once recovery ran: if it fails (Redis gone again), the next probe
        # tries again.
        await self._on_lost()
        self._known = marker
        self.losses += 1
        self.lost.set()

    def _check_masters(self) -> None:
        """On a cluster, a change of its masters (a failover, or masters added or removed)
        runs ``on_failover`` once: a promoted replica lacks what its master acknowledged but had
        not sent it yet (Redis replicates asynchronously), so jobs may be gone."""
        masters = self._backend.masters()
        if masters is None:
            return
        known, self._masters = self._masters, masters
        if known is None or masters == known:
            return
        self.failovers += 1
        log.warning(
            "the Redis Cluster's masters changed (gone: %s; new: %s): a replica promoted in a "
            "failover lacks the writes its master had not yet sent it; every stream checks that "
            "what it follows still exists (README, Scaling out)",
            ", ".join(sorted(known - masters)) or "none",
            ", ".join(sorted(masters - known)) or "none",
        )
        if self._on_failover is not None:
            self._on_failover()


async def warn_without_persistence(backend: MarkedBackend) -> None:
    """Log a WARNING when the backend would lose accepted work on a restart."""
    if backend.name == "memory":
        return  # the in-memory registry warns about itself at start
    found = await backend.persistence()
    if found.aof is True:
        return
    if found.aof is None:
        log.warning(
            "could not read Redis' persistence settings (CONFIG and INFO refused): make sure it "
            "runs with appendonly yes, or a restart loses accepted work (README, Operations)"
        )
    elif found.snapshots:
        log.warning(
            "Redis runs without AOF (appendonly no), with RDB snapshots only: a restart loses "
            "every key, session, job and batch written since the last snapshot; set appendonly "
            "yes (README, Operations)"
        )
    elif found.snapshots is None:
        log.warning(
            "Redis runs without AOF (appendonly no; CONFIG refused, RDB snapshots unknown): a "
            "restart loses at least what was written since the last snapshot; set appendonly "
            "yes (README, Operations)"
        )
    else:
        log.warning(
            "Redis has no persistence (appendonly no, no RDB snapshots): a restart loses every "
            "API key, session, job, batch and queued item; set appendonly yes "
            "(README, Operations)"
        )

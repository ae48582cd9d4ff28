"""Which Redis node serves the shard channels of which slots, and a client per node for the
event readers' connections (registry.redis_events).

A single Redis is one node that owns every slot. A Redis Cluster's layout is read with
``CLUSTER SLOTS`` from any node that answers (the seeds of the URL first, then every node
seen since, replicas included, so a promoted replica is found when its old master is gone).
Each node gets a small pool of its own, built from the URL with the node's address: the
reader's pub/sub connection is taken from it, never from the stores' pools.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.crc import key_slot

from domain.errors import Unavailable
from registry.redis_client import as_str, create_redis
from registry.redis_url import parse_redis_url

log = logging.getLogger(__name__)

SLOTS = 16384

# The name of the node of a single Redis.
SINGLE_NODE = "redis"
# Longest wait for one node's CLUSTER SLOTS (a hung node must not hold up the others').
LAYOUT_TIMEOUT_S = 2.0


def slot_of(name: str) -> int:
    """The cluster slot of a key or shard channel (its hash tag's, when it has one)."""
    return key_slot(name.encode(), SLOTS)


_tags: dict[int, str] = {}


def tag_in_slot(slot: int) -> str:
    """A short hash tag whose slot is ``slot`` (found once per slot, then remembered)."""
    tag = _tags.get(slot)
    if tag is None:
        n = 0
        while key_slot(str(n).encode(), SLOTS) != slot:
            n += 1
        tag = _tags[slot] = str(n)
    return tag


@dataclass(frozen=True, slots=True)
class Layout:
    """The masters and the slot ranges each owns: ``ranges`` sorted, each (start, end, node
    name)."""

    ranges: tuple[tuple[int, int, str], ...]
    _starts: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_starts", [start for start, _, _ in self.ranges])

    @property
    def nodes(self) -> list[str]:
        return sorted({name for _, _, name in self.ranges})

    def node_of(self, slot: int) -> str | None:
        """The master owning ``slot``, or None while no master does."""
        index = bisect.bisect_right(self._starts, slot) - 1
        if index < 0:
            return None
        start, end, name = self.ranges[index]
        return name if start <= slot <= end else None

    def first_slot(self, node: str) -> int | None:
        """The lowest slot ``node`` owns (its heartbeat channel's), None when it owns none."""
        return next((start for start, _, name in self.ranges if name == node), None)


class ShardNodes(Protocol):
    """Where shard channels live, and a client per node."""

    async def layout(self) -> Layout:
        """The current layout; raises domain.errors.Unavailable when no node answers."""
        ...

    def client(self, node: str) -> Redis:
        """The pooled client of ``node`` (a name of a layout)."""
        ...

    async def aclose(self) -> None: ...


class SingleNode:
    """One Redis, owner of every slot."""

    def __init__(self, client: Redis) -> None:
        self._client = client

    async def layout(self) -> Layout:
        return Layout(((0, SLOTS - 1, SINGLE_NODE),))

    def client(self, node: str) -> Redis:
        return self._client

    async def aclose(self) -> None:
        await self._client.aclose()


def node_url(url: str, host: str, port: int) -> str:
    """``url`` (one Redis: credentials, database, options) pointing at ``host:port``."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    netloc = f"{userinfo}@{address}" if userinfo else address
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class ClusterNodes:
    """The masters of a Redis Cluster, read from its nodes with CLUSTER SLOTS."""

    def __init__(
        self,
        url: str,
        *,
        socket_timeout_s: float,
        connect_timeout_s: float,
        client_name: str = "agent-orchestrator-events",
    ) -> None:
        target = parse_redis_url(url)
        if not target.cluster:
            raise ValueError("ClusterNodes needs a redis+cluster:// URL")
        self._url = target.url
        self._socket_timeout_s = socket_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._client_name = client_name
        # Every node seen (seeds first), by name: the ones to ask for the layout.
        self._addresses: dict[str, tuple[str, int]] = {
            f"{host}:{port}": (host, port) for host, port in target.seeds
        }
        self._clients: dict[str, Redis] = {}
        self._last_answered: str | None = None

    def client(self, node: str) -> Redis:
        client = self._clients.get(node)
        if client is None:
            host, port = self._addresses[node]
            client = self._clients[node] = create_redis(
                node_url(self._url, host, port),
                socket_timeout_s=self._socket_timeout_s,
                connect_timeout_s=self._connect_timeout_s,
                # The reader's pub/sub connection and one for CLUSTER SLOTS.
                max_connections=3,
                client_name=self._client_name,
                retries=0,
            )
        return client

    async def layout(self) -> Layout:
        names = list(self._addresses)
        if self._last_answered in self._addresses:
            names.remove(self._last_answered)
            names.insert(0, self._last_answered)
        problems: list[str] = []
        for name in names:
            try:
                async with asyncio.timeout(LAYOUT_TIMEOUT_S):
                    reply = await self.client(name).execute_command(  # type: ignore[no-untyped-call]
                        "CLUSTER", "SLOTS"
                    )
            except (redis_errors.RedisError, OSError, TimeoutError) as exc:
                problems.append(f"{name}: {exc}")
                continue
            layout = self._parse(reply, self._addresses[name][0])
            if not layout.ranges:  # a node that lost its configuration, or not joined yet
                problems.append(f"{name}: no slots assigned")
                continue
            self._last_answered = name
            return layout
        raise Unavailable("no Redis Cluster node answered CLUSTER SLOTS: " + "; ".join(problems))

    def _parse(self, reply: Any, asked_host: str) -> Layout:
        ranges: list[tuple[int, int, str]] = []
        for entry in reply:
            start, end, *nodes = entry
            names: list[str] = []
            for node in nodes:
                host = as_str(node[0]) or asked_host  # "" or "?": the host that answered
                if host == "?":
                    host = asked_host
                port = int(node[1])
                name = f"{host}:{port}"
                self._addresses.setdefault(name, (host, port))
                names.append(name)
            if names:
                ranges.append((int(start), int(end), names[0]))
        ranges.sort()
        return Layout(tuple(ranges))

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

"""What a ``REDIS_URL`` names: one Redis, or a Redis Cluster by its seed nodes.

``redis://`` and ``rediss://`` (TLS) name one Redis, as redis-py reads them (host, port, db,
credentials, query options). ``redis+cluster://host:port[,host:port...]`` (``rediss+cluster``
for TLS) names a Redis Cluster by one or more seed nodes: the client asks them for the cluster's
layout and talks to every master from then on. A cluster URL takes credentials
(``user:password@`` before the first node) and the query options of a single URL, but no
database (a cluster has only db 0) and no Unix socket. ``parse_redis_url`` checks a URL without
any I/O, so a bad one stops the server at startup with a clear message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from redis.asyncio.connection import parse_url

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
SINGLE_SCHEMES = ("redis", "rediss", "unix")
# A cluster URL's seed list is bounded: the client needs one live node to find the rest.
MAX_SEED_NODES = 32


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed REDIS_URL. ``url`` is what redis-py reads for one Redis; a cluster's ``url`` is
    the single-node URL of its first seed (credentials and options included), ``seeds`` every
    seed node."""

    url: str
    cluster: bool = False
    seeds: tuple[tuple[str, int], ...] = ()
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def tls(self) -> bool:
        return self.url.startswith("rediss://")


def parse_redis_url(url: str) -> RedisTarget:
    """The target ``url`` names; raises ValueError with what is wrong (never shows a password)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or not rest:
        raise ValueError(
            "REDIS_URL must look like redis://host:port/0, rediss://... or "
            "redis+cluster://host:port[,host:port...]"
        )
    if scheme in SINGLE_SCHEMES:
        try:
            options = parse_url(url)
        except ValueError as exc:
            raise ValueError(f"REDIS_URL: {exc}") from None
        return RedisTarget(url, options=dict(options))
    if scheme not in CLUSTER_SCHEMES:
        raise ValueError(
            f"REDIS_URL scheme {scheme!r} is not one of redis, rediss, unix, redis+cluster, "
            "rediss+cluster"
        )
    single_scheme = CLUSTER_SCHEMES[scheme]
    netloc, _, tail = _split_netloc(rest)
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        userinfo, hosts = "", netloc
    path, _, query = tail.partition("?")
    if path not in ("", "/", "/0"):
        raise ValueError("REDIS_URL: a Redis Cluster has only database 0 (drop the path)")
    seeds = tuple(_seed(part) for part in hosts.split(","))
    if len(seeds) > MAX_SEED_NODES:
        raise ValueError(f"REDIS_URL: at most {MAX_SEED_NODES} seed nodes")
    first_host, first_port = seeds[0]
    host = f"[{first_host}]" if ":" in first_host else first_host
    credentials = f"{userinfo}@" if userinfo else ""
    single = f"{single_scheme}://{credentials}{host}:{first_port}/0"
    if query:
        single += f"?{query}"
    try:
        options = parse_url(single)
    except ValueError as exc:
        raise ValueError(f"REDIS_URL: {exc}") from None
    return RedisTarget(single, cluster=True, seeds=seeds, options=dict(options))


def _split_netloc(rest: str) -> tuple[str, str, str]:
    """``rest`` (after ``scheme://``) as (netloc, separator, path and query)."""
    for index, char in enumerate(rest):
        if char in "/?":
            return rest[:index], char, rest[index:]
    return rest, "", ""


def _seed(part: str) -> tuple[str, int]:
    """One ``host:port`` (``[v6]:port``) of a cluster URL's seed list."""
    text = unquote(part.strip())
    if text.startswith("["):
        host, close, port_text = text[1:].partition("]")
        port_text = port_text.removeprefix(":") if close else ""
    else:
        host, _, port_text = text.rpartition(":")
    if not host or not port_text:
        raise ValueError(f"REDIS_URL: seed node {text!r} must be host:port")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"REDIS_URL: seed node {text!r} has no numeric port") from None
    if not 0 < port < 65536:
        raise ValueError(f"REDIS_URL: seed node {text!r} has a port out of range")
    return host, port

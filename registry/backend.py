"""The storage backend of a process, built in one place: Redis when a URL is given, process
memory otherwise. ``open_backend`` is the only code that chooses between the two; everything a
process stores or shares (the stores, the work queues, the rate limiter, the event fan-out, the
data-set marker) comes out of it as one ``Backend`` closed by one ``aclose()``.

Redis connections. redis-py fixes ``decode_responses`` per connection pool (a connection's
encoder is made from the pool's arguments), so a client that wants raw bytes cannot borrow a
decoding client's connections. The stores, the rate limiter and the marker read text, so they
share one decoding pool; the work queues carry opaque bytes (payloads and results), so every
work queue of the backend shares one raw pool (before, each queue opened its own). The event
fan-out keeps its own small pool (one per master on a cluster: registry.shard_nodes), whose
socket timeout outlasts its blocking pub/sub read.
Three pools per process, however many queues; no pool does I/O before its first call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from redis import exceptions as redis_errors
from redis.asyncio import Redis, RedisCluster

from domain.ports.api_keys import ApiKeyStore
from domain.ports.batches import BatchStore
from domain.ports.embedding_cache import EmbeddingCache
from domain.ports.events import EventLog
from domain.ports.jobs import JobStore
from domain.ports.platform import AgentCache
from domain.ports.queue import QueueConfig, WorkQueue
from domain.ports.rate_limits import RateLimiter
from domain.ports.sessions import SessionStore
from domain.ports.usage import UsageStore
from registry.agent_cache_memory import MemoryAgentCache
from registry.agent_cache_redis import RedisAgentCache
from registry.api_keys_memory import MemoryApiKeyStore
from registry.api_keys_redis import RedisApiKeyStore
from registry.fanout import LocalFanout
from registry.keys import MAX_QUEUE_SHARDS as MAX_QUEUE_SHARDS  # for the settings' bound
from registry.keys import KeySpace
from registry.memory_batches import MemoryBatchStore
from registry.memory_jobs import MemoryEventLog, MemoryJobStore
from registry.memory_queue import MemoryWorkQueue
from registry.memory_rate_limiter import MemoryRateLimiter
from registry.memory_sessions import MemorySessionStore
from registry.memory_usage import MemoryEmbeddingCache, MemoryUsageStore
from registry.redis_batches import RedisBatchStore
from registry.redis_client import create_redis, is_cluster, redis_errors_as_unavailable
from registry.redis_events import RedisEventLog
from registry.redis_jobs import EventLogConfig, RedisJobStore
from registry.redis_queue import RedisWorkQueue, create_queue_redis
from registry.redis_rate_limiter import RedisRateLimiter
from registry.redis_sessions import RedisSessionStore
from registry.redis_url import parse_redis_url
from registry.redis_usage import RedisEmbeddingCache, RedisUsageStore
from registry.shard_nodes import ClusterNodes

# How long the event reader blocks on its pub/sub connection before it checks its state; the
# connection's socket timeout is longer than this, so an idle subscription is never mistaken for
# a dead one.
EVENT_READ_BLOCK_S = 5.0


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """What the backend needs to know; built from the server settings
    (server.backend_config)."""

    redis_url: str | None
    key_prefix: str
    session_retention_ms: int
    socket_timeout_s: float = 2.0
    connect_timeout_s: float = 1.0
    # Per pool: the stores' pool and the work queues' pool each get this many connections.
    max_connections: int = 64
    event_log_max_events: int = 1000
    event_log_ttl_ms: int = 24 * 3600 * 1000
    batch_retention_ms: int = 7 * 24 * 3600 * 1000
    # Shards of each work queue (registry.redis_queue); None: 1 on one Redis, 8 on a cluster.
    queue_shards: int | None = None
    # Event readers (registry.redis_events): how often each hears a heartbeat, and after how
    # long without one it is silent (reported in health, reconnected).
    event_heartbeat_interval_s: float = 1.0
    event_heartbeat_timeout_s: float = 5.0
    # A rolling upgrade from releases with classic pub/sub: publish and subscribe both ways.
    event_pubsub_legacy: bool = False


@dataclass(frozen=True, slots=True)
class Persistence:
    """How the backend keeps its data over a restart; None where it could not be read."""

    aof: bool | None
    snapshots: bool | None

    @property
    def durable(self) -> bool:
        """Accepted work survives a restart (up to the AOF's fsync policy)."""
        return self.aof is not False


class MemoryInstance:
    """The embedded data set: always reachable, never lost under a running process."""

    name = "memory"

    def __init__(self) -> None:
        self._marker: str | None = None

    async def ping(self) -> None:
        return None

    async def instance_marker(self, candidate: str) -> str:
        """Process memory is never lost under a running process: the first marker stays."""
        if self._marker is None:
            self._marker = candidate
        return self._marker

    async def persistence(self) -> Persistence:
        return Persistence(aof=False, snapshots=False)

    def masters(self) -> frozenset[str] | None:
        """Not a cluster: no masters to watch."""
        return None


class RedisInstance:
    """The Redis data set behind the stores' pool: reachability, marker, persistence."""

    name = "redis"

    def __init__(self, redis: Redis, keys: KeySpace | None = None) -> None:
        self.redis = redis
        self._keys = keys or KeySpace()

    async def ping(self) -> None:
        with redis_errors_as_unavailable():
            await self.redis.ping()

    def masters(self) -> frozenset[str] | None:
        """On a cluster, the masters (host:port) of the client's slot map as it stands (it is
        read again after a call meets a moved slot or a dead node); None for one Redis."""
        if not is_cluster(self.redis):
            return None
        cluster = cast(RedisCluster, self.redis)
        return frozenset(node.name for node in cluster.get_primaries())

    async def instance_marker(self, candidate: str) -> str:
        """The data set's marker: ``candidate`` if there was none (stored, in the same
        command), else the one stored. Raises Unavailable when Redis cannot be reached,
        redis ResponseError when it refuses writes (a read-only replica, out of memory)."""
        with redis_errors_as_unavailable():
            # SET NX GET (Redis 7): sets only when missing, returns the previous value.
            previous = await self.redis.set(
                self._keys.instance_marker(), candidate, nx=True, get=True
            )
        return candidate if previous is None else str(previous)

    async def persistence(self) -> Persistence:
        """AOF and RDB snapshot settings from CONFIG GET, or from INFO persistence when CONFIG
        is forbidden (renamed or denied by ACL; snapshots then unknown)."""
        with redis_errors_as_unavailable():
            try:
                config = await self.redis.config_get("appendonly")
                config.update(await self.redis.config_get("save"))
                return Persistence(
                    aof=str(config.get("appendonly", "")).lower() == "yes",
                    snapshots=bool(str(config.get("save", "")).strip()),
                )
            except redis_errors.ResponseError:
                pass
            try:
                info = await self.redis.info("persistence")
            except redis_errors.ResponseError:
                return Persistence(aof=None, snapshots=None)
        aof = info.get("aof_enabled")
        return Persistence(aof=None if aof is None else str(aof) == "1", snapshots=None)


# Builds the work queue of a name on the backend's queue pool (or in memory).
QueueOpener = Callable[[str, QueueConfig | None], WorkQueue]


@dataclass(slots=True)
class Backend:
    """Everything one process keeps in the backend, over one set of connections."""

    # Reachability, the data-set marker and persistence (server.health, server.data_loss).
    instance: MemoryInstance | RedisInstance
    sessions: SessionStore
    jobs: JobStore
    events: EventLog
    # The feeds of this process's client streams (to end them all on shutdown, or have them
    # check what they follow after a data loss).
    fanout: LocalFanout
    api_keys: ApiKeyStore
    batches: BatchStore
    usage: UsageStore
    embedding_cache: EmbeddingCache
    # Agent configurations, shared by every process on the backend (domain.agent_directory).
    agent_cache: AgentCache
    rate_limiter: RateLimiter
    queue_opener: QueueOpener
    # What is wrong with the live event readers of this process now (for health), or None.
    events_problem: Callable[[], str | None] = lambda: None
    # Clients to close after everything above (the Redis pools).
    pools: tuple[Redis, ...] = ()
    _queues: dict[str, tuple[WorkQueue, QueueConfig | None]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """ "memory" or "redis", for logs and for what only an embedded process may do."""
        return self.instance.name

    def work_queue(self, name: str, config: QueueConfig | None = None) -> WorkQueue:
        """The work queue ``name``: opened on first use, the same object afterwards (one
        pub/sub listener per queue and process), closed with the backend."""
        if name in self._queues:
            queue, opened_with = self._queues[name]
            if config is not None and config != opened_with:
                raise ValueError(f"work queue {name!r} is already open with another config")
            return queue
        queue = self.queue_opener(name, config)
        self._queues[name] = (queue, config)
        return queue

    async def aclose(self) -> None:
        for queue, _ in self._queues.values():
            await queue.aclose()
        self._queues.clear()
        await self.events.aclose()
        for pool in self.pools:
            await pool.aclose()


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a REDIS_URL (one Redis, or ``redis+cluster://`` seed nodes:
    registry.redis_url), or None; no I/O, for the settings' check at startup."""
    try:
        parse_redis_url(url)
    except ValueError as exc:
        return str(exc)
    return None


def open_backend(config: BackendConfig) -> Backend:
    """The backend ``config`` names; no I/O happens until the first call."""
    return open_redis_backend(config) if config.redis_url else open_memory_backend(config)


def open_memory_backend(config: BackendConfig) -> Backend:
    """Everything in process memory: one process only, gone when it stops."""
    events = MemoryEventLog(max_events=config.event_log_max_events, ttl_ms=config.event_log_ttl_ms)
    sessions = MemorySessionStore(
        retention_ms=config.session_retention_ms, on_close=events.session_closed
    )
    usage = MemoryUsageStore()
    api_keys = MemoryApiKeyStore()
    return Backend(
        instance=MemoryInstance(),
        sessions=sessions,
        jobs=MemoryJobStore(sessions, events, usage=usage),
        events=events,
        fanout=events.fanout,
        api_keys=api_keys,
        batches=MemoryBatchStore(retention_ms=config.batch_retention_ms),
        usage=usage,
        embedding_cache=MemoryEmbeddingCache(),
        agent_cache=MemoryAgentCache(),
        rate_limiter=MemoryRateLimiter(keys=api_keys),
        queue_opener=lambda _name, queue_config: MemoryWorkQueue(queue_config),
    )


def open_redis_backend(config: BackendConfig) -> Backend:
    """Everything on the Redis at ``config.redis_url``, shared by every process using it: one
    Redis, or a Redis Cluster for a ``redis+cluster://`` URL (registry.redis_client)."""
    if not config.redis_url:
        raise ValueError("the Redis backend needs a URL")
    redis = create_redis(
        config.redis_url,
        socket_timeout_s=config.socket_timeout_s,
        connect_timeout_s=config.connect_timeout_s,
        max_connections=config.max_connections,
    )
    queue_redis = create_queue_redis(
        config.redis_url,
        socket_timeout_s=config.socket_timeout_s,
        connect_timeout_s=config.connect_timeout_s,
        max_connections=config.max_connections,
    )
    subscriber: Redis | ClusterNodes
    if parse_redis_url(config.redis_url).cluster:
        # One pub/sub connection per master, to the owner of each session's slot.
        subscriber = ClusterNodes(
            config.redis_url,
            socket_timeout_s=EVENT_READ_BLOCK_S + 5.0,
            connect_timeout_s=config.connect_timeout_s,
        )
    else:
        subscriber = create_redis(
            config.redis_url,
            socket_timeout_s=EVENT_READ_BLOCK_S + 5.0,
            connect_timeout_s=config.connect_timeout_s,
            max_connections=2,
            client_name="agent-orchestrator-events",
            retries=0,
        )
    keys = KeySpace(config.key_prefix)
    log_config = EventLogConfig(
        config.event_log_max_events,
        config.event_log_ttl_ms,
        legacy_channel=config.event_pubsub_legacy,
    )
    events = RedisEventLog(
        redis,
        subscriber,
        keys,
        read_block_s=EVENT_READ_BLOCK_S,
        heartbeat_interval_s=config.event_heartbeat_interval_s,
        heartbeat_timeout_s=config.event_heartbeat_timeout_s,
        legacy_channels=config.event_pubsub_legacy,
    )

    def open_queue(name: str, queue_config: QueueConfig | None) -> WorkQueue:
        return RedisWorkQueue(
            queue_redis, keys, queue=name, config=queue_config, shards=config.queue_shards
        )

    return Backend(
        instance=RedisInstance(redis, keys),
        sessions=RedisSessionStore(
            redis,
            keys,
            retention_ms=config.session_retention_ms,
            legacy_channel=config.event_pubsub_legacy,
        ),
        jobs=RedisJobStore(
            redis, keys, log_config, session_retention_ms=config.session_retention_ms
        ),
        events=events,
        fanout=events.fanout,
        api_keys=RedisApiKeyStore(redis, keys),
        batches=RedisBatchStore(redis, keys, retention_ms=config.batch_retention_ms),
        usage=RedisUsageStore(redis, keys),
        embedding_cache=RedisEmbeddingCache(redis, keys),
        agent_cache=RedisAgentCache(redis, keys),
        rate_limiter=RedisRateLimiter(redis, keys),
        queue_opener=open_queue,
        events_problem=events.readers_problem,
        # The subscriber's pool is closed by the event log.
        pools=(queue_redis, redis),
    )

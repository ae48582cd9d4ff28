"""Opening the configured storage backend: Redis when a URL is given, memory otherwise."""

from __future__ import annotations

from dataclasses import dataclass

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from domain.ports.api_keys import ApiKeyStore
from domain.ports.batches import BatchStore
from domain.ports.embedding_cache import EmbeddingCache
from domain.ports.events import EventLog
from domain.ports.jobs import JobStore
from domain.ports.sessions import SessionStore
from domain.ports.usage import UsageStore
from registry.api_keys_memory import MemoryApiKeyStore
from registry.api_keys_redis import RedisApiKeyStore
from registry.fanout import LocalFanout
from registry.keys import KeySpace
from registry.memory_batches import MemoryBatchStore
from registry.memory_jobs import MemoryEventLog, MemoryJobStore
from registry.memory_sessions import MemorySessionStore
from registry.memory_usage import MemoryEmbeddingCache, MemoryUsageStore
from registry.redis_batches import RedisBatchStore
from registry.redis_client import create_redis, redis_errors_as_unavailable
from registry.redis_events import RedisEventLog
from registry.redis_jobs import EventLogConfig, RedisJobStore
from registry.redis_sessions import RedisSessionStore
from registry.redis_usage import RedisEmbeddingCache, RedisUsageStore

# How long the event reader blocks on its pub/sub connection before it checks its state; the
# connection's socket timeout is longer than this, so an idle subscription is never mistaken for
# a dead one.
EVENT_READ_BLOCK_S = 5.0


@dataclass(frozen=True, slots=True)
class Persistence:
    """How the backend keeps its data over a restart; None where it could not be read."""

    aof: bool | None
    snapshots: bool | None

    @property
    def durable(self) -> bool:
        """Accepted work survives a restart (up to the AOF's fsync policy)."""
        return self.aof is not False


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """What the registry needs to know; built from server settings."""

    redis_url: str | None
    key_prefix: str
    session_retention_ms: int
    socket_timeout_s: float = 2.0
    connect_timeout_s: float = 1.0
    max_connections: int = 64
    event_log_max_events: int = 1000
    event_log_ttl_ms: int = 24 * 3600 * 1000
    batch_retention_ms: int = 7 * 24 * 3600 * 1000


class MemoryBackend:
    """The embedded backend: always healthy, nothing to close."""

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

    async def aclose(self) -> None:
        return None


class RedisBackend:
    """A Redis connection pool shared by the Redis stores."""

    name = "redis"

    def __init__(self, redis: Redis, keys: KeySpace | None = None) -> None:
        self.redis = redis
        self._keys = keys or KeySpace()

    async def ping(self) -> None:
        with redis_errors_as_unavailable():
            await self.redis.ping()

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

    async def aclose(self) -> None:
        await self.redis.aclose()


@dataclass(slots=True)
class Registry:
    """The stores of one process, over one backend."""

    backend: MemoryBackend | RedisBackend
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

    async def aclose(self) -> None:
        await self.events.aclose()
        await self.backend.aclose()


def open_registry(config: RegistryConfig) -> Registry:
    """Build the stores; no I/O happens until the first call."""
    if not config.redis_url:
        events = MemoryEventLog(
            max_events=config.event_log_max_events, ttl_ms=config.event_log_ttl_ms
        )
        sessions = MemorySessionStore(
            retention_ms=config.session_retention_ms, on_close=events.session_closed
        )
        usage = MemoryUsageStore()
        return Registry(
            backend=MemoryBackend(),
            sessions=sessions,
            jobs=MemoryJobStore(sessions, events, usage=usage),
            events=events,
            fanout=events.fanout,
            api_keys=MemoryApiKeyStore(),
            batches=MemoryBatchStore(retention_ms=config.batch_retention_ms),
            usage=usage,
            embedding_cache=MemoryEmbeddingCache(),
        )
    redis = create_redis(
        config.redis_url,
        socket_timeout_s=config.socket_timeout_s,
        connect_timeout_s=config.connect_timeout_s,
        max_connections=config.max_connections,
    )
    subscriber = create_redis(
        config.redis_url,
        socket_timeout_s=EVENT_READ_BLOCK_S + 5.0,
        connect_timeout_s=config.connect_timeout_s,
        max_connections=2,
        client_name="agent-orchestrator-events",
        retries=0,
    )
    keys = KeySpace(config.key_prefix)
    log_config = EventLogConfig(config.event_log_max_events, config.event_log_ttl_ms)
    redis_events = RedisEventLog(redis, subscriber, keys, read_block_s=EVENT_READ_BLOCK_S)
    return Registry(
        backend=RedisBackend(redis, keys),
        sessions=RedisSessionStore(redis, keys, retention_ms=config.session_retention_ms),
        jobs=RedisJobStore(redis, keys, log_config),
        events=redis_events,
        fanout=redis_events.fanout,
        api_keys=RedisApiKeyStore(redis, keys),
        batches=RedisBatchStore(redis, keys, retention_ms=config.batch_retention_ms),
        usage=RedisUsageStore(redis, keys),
        embedding_cache=RedisEmbeddingCache(redis, keys),
    )

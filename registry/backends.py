"""Opening the configured storage backend: Redis when a URL is given, memory otherwise."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from registry.api_keys_memory import MemoryApiKeyStore
from registry.api_keys_redis import RedisApiKeyStore
from registry.base import ApiKeyStore, SessionStore
from registry.keys import KeySpace
from registry.memory_sessions import MemorySessionStore
from registry.redis_client import create_redis, redis_errors_as_unavailable
from registry.redis_sessions import RedisSessionStore


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """What the registry needs to know; built from server settings."""

    redis_url: str | None
    key_prefix: str
    session_retention_ms: int
    socket_timeout_s: float = 2.0
    connect_timeout_s: float = 1.0
    max_connections: int = 64


class MemoryBackend:
    """The embedded backend: always healthy, nothing to close."""

    name = "memory"

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class RedisBackend:
    """A Redis connection pool shared by the Redis stores."""

    name = "redis"

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def ping(self) -> None:
        with redis_errors_as_unavailable():
            await self.redis.ping()

    async def aclose(self) -> None:
        await self.redis.aclose()


@dataclass(slots=True)
class Registry:
    """The stores of one process, over one backend."""

    backend: MemoryBackend | RedisBackend
    sessions: SessionStore
    api_keys: ApiKeyStore


def open_registry(config: RegistryConfig) -> Registry:
    """Build the stores; no I/O happens until the first call."""
    if not config.redis_url:
        return Registry(
            backend=MemoryBackend(),
            sessions=MemorySessionStore(retention_ms=config.session_retention_ms),
            api_keys=MemoryApiKeyStore(),
        )
    redis = create_redis(
        config.redis_url,
        socket_timeout_s=config.socket_timeout_s,
        connect_timeout_s=config.connect_timeout_s,
        max_connections=config.max_connections,
    )
    keys = KeySpace(config.key_prefix)
    return Registry(
        backend=RedisBackend(redis),
        sessions=RedisSessionStore(redis, keys, retention_ms=config.session_retention_ms),
        api_keys=RedisApiKeyStore(redis, keys),
    )

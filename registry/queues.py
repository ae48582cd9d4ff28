"""Opening a work queue on the configured backend: Redis when a URL is given, memory otherwise
(the single-process embedded default, like registry.backends does for the stores)."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from domain.ports.queue import QueueConfig, WorkQueue
from registry.keys import KeySpace
from registry.memory_queue import MemoryWorkQueue
from registry.redis_queue import RedisWorkQueue, create_queue_redis


@dataclass(slots=True)
class OpenedQueue:
    """A queue and what must be closed with it (the queue's own Redis client, if any)."""

    queue: WorkQueue
    redis: Redis | None = None

    async def aclose(self) -> None:
        await self.queue.aclose()
        if self.redis is not None:
            await self.redis.aclose()


def open_work_queue(
    redis_url: str | None,
    *,
    key_prefix: str = "ao",
    queue: str = "work",
    config: QueueConfig | None = None,
    socket_timeout_s: float = 2.0,
    connect_timeout_s: float = 1.0,
    max_connections: int = 64,
) -> OpenedQueue:
    """Build the queue; no I/O happens until the first call. The Redis queue gets a client of
    its own because it needs raw bytes (the stores' client decodes responses)."""
    if not redis_url:
        return OpenedQueue(MemoryWorkQueue(config))
    redis = create_queue_redis(
        redis_url,
        socket_timeout_s=socket_timeout_s,
        connect_timeout_s=connect_timeout_s,
        max_connections=max_connections,
    )
    return OpenedQueue(
        RedisWorkQueue(redis, KeySpace(key_prefix), queue=queue, config=config), redis
    )

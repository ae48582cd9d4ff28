"""Token usage and the embedding cache in Redis (domain.ports.usage.UsageStore, EmbeddingCache).

Usage hashes are written by the job store's notice script (registry/lua/jobs/notice.lua), one per
tenant and UTC day, under the tenant's hash tag; this module only reads them.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from domain.models import TokenUsage
from domain.ports.usage import DayUsage
from registry.keys import KeySpace
from registry.redis_client import RedisStore, as_str, redis_errors_as_unavailable

_AGENT = "agent:"


def day_usage_from_hash(day: int, raw: dict[Any, Any]) -> DayUsage:
    fields = {as_str(k): int(as_str(v)) for k, v in raw.items()}
    agents = {k[len(_AGENT) :]: v for k, v in fields.items() if k.startswith(_AGENT)}
    return DayUsage(
        day=day,
        usage=TokenUsage(
            fields.get("prompt", 0), fields.get("completion", 0), fields.get("total", 0)
        ),
        agents=agents,
        jobs=fields.get("jobs", 0),
    )


class RedisUsageStore(RedisStore):
    """domain.ports.usage.UsageStore on Redis."""

    SCRIPTS = "usage"

    async def usage_days(self, tenant_id: str, first_day: int, last_day: int) -> list[DayUsage]:
        days = list(range(first_day, last_day + 1))
        with redis_errors_as_unavailable():
            async with self._redis.pipeline(transaction=False) as pipe:
                for day in days:
                    pipe.hgetall(self._keys.usage_day(tenant_id, day))
                replies = await pipe.execute()
        pairs = zip(days, replies, strict=True)
        return [day_usage_from_hash(day, raw) for day, raw in pairs if raw]

    async def tokens_today(self, tenant_id: str) -> int:
        with redis_errors_as_unavailable():
            prefix = self._keys.usage_prefix(tenant_id)
            reply = await self._scripts.run("tokens_today", keys=[prefix], args=[prefix])
        return int(reply)


class RedisEmbeddingCache:
    """domain.ports.embedding_cache.EmbeddingCache on Redis: one string per entry, expiring
    with PX."""

    def __init__(self, redis: Redis, keys: KeySpace) -> None:
        self._redis = redis
        self._keys = keys

    async def get_result(self, tenant_id: str, key: str) -> str | None:
        with redis_errors_as_unavailable():
            raw = await self._redis.get(self._keys.embedding_cache(tenant_id, key))
        return None if raw is None else as_str(raw)

    async def put_result(self, tenant_id: str, key: str, result_json: str, ttl_ms: int) -> None:
        with redis_errors_as_unavailable():
            await self._redis.set(
                self._keys.embedding_cache(tenant_id, key), result_json, px=max(1, ttl_ms)
            )

"""The embedding result cache store (registry.redis_usage on Redis, registry.memory_usage in
memory). What is cached, and under which key, is decided in domain.embedding_cache."""

from __future__ import annotations

from typing import Protocol


class EmbeddingCache(Protocol):
    """Embedding results by tenant and cache key (domain.embedding_cache builds the key),
    shared by every replica using the backend."""

    async def get_result(self, tenant_id: str, key: str) -> str | None:
        """The cached result (JSON), or None when missing or expired."""
        ...

    async def put_result(self, tenant_id: str, key: str, result_json: str, ttl_ms: int) -> None:
        """Store a result for ``ttl_ms`` milliseconds (replacing any older one)."""
        ...

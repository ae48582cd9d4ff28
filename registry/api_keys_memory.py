"""API keys in process memory: the embedded default when no Redis is configured."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import replace

from domain.models import Page
from domain.ports.api_keys import ApiKey
from domain.rate_limits import KeyRef
from registry.memory_sessions import wall_clock_ms


class MemoryApiKeyStore:
    """domain.ports.api_keys.ApiKeyStore in a dict."""

    def __init__(self, *, clock: Callable[[], int] = wall_clock_ms) -> None:
        self._clock = clock
        self._keys: dict[str, ApiKey] = {}
        self._index: dict[str, list[str]] = {}  # tenant -> key ids, ascending

    async def add_key(self, key: ApiKey) -> ApiKey | None:
        if key.key_id in self._keys:
            return None
        stored = replace(key, created_at_ms=self._clock(), revoked_at_ms=None)
        self._keys[key.key_id] = stored
        bisect.insort(self._index.setdefault(key.tenant_id, []), key.key_id)
        return stored

    async def get_key(self, key_id: str) -> ApiKey | None:
        return self._keys.get(key_id)

    def is_live(self, key: KeyRef) -> bool:
        """Whether the key exists, belongs to ``key.tenant_id`` and is not revoked (what the
        memory rate limiter checks; registry.redis_rate_limiter does the same in its script)."""
        record = self._keys.get(key.key_id)
        return record is not None and record.tenant_id == key.tenant_id and not record.revoked

    async def get_keys(self, key_ids: Sequence[str]) -> list[ApiKey | None]:
        return [self._keys.get(key_id) for key_id in key_ids]

    async def list_keys(self, tenant_id: str, *, limit: int, after: str | None) -> Page[ApiKey]:
        ids = self._index.get(tenant_id, [])
        start = bisect.bisect_right(ids, after) if after else 0
        chosen = ids[start : start + limit]
        more = start + limit < len(ids)
        return Page([self._keys[k] for k in chosen], chosen[-1] if more and chosen else None)

    async def revoke_key(self, key_id: str) -> ApiKey | None:
        key = self._keys.get(key_id)
        if key is None or key.revoked:
            return key
        key = replace(key, revoked_at_ms=self._clock())
        self._keys[key_id] = key
        return key

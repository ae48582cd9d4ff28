"""The embedding result cache: the same (tenant, model, text) is answered without a downstream
call while a cached result is fresh.

The key is the SHA-256 of the configured model version (``ORCH_EMBEDDING_MODEL_VERSION``), the
requested model name and the text; entries are per tenant (the registry scopes them), so one
tenant never sees another's results. The model version comes from the settings, not from the
result's ``model`` string, because the lookup happens before any result exists: when the
embedding model behind a name changes, bump the version and every older entry stops matching
(and expires with its TTL).

A miss records the key with the job; when the job's completed notice arrives the notice
processor stores its result under that key (a fill), so every replica on the same Redis shares
the cache. A hit still goes through the normal job flow (job record, accepted and completed
events, usage 0) without calling the service.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from domain.errors import Unavailable
from domain.ports.embedding_cache import EmbeddingCache

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EmbeddingCachePolicy:
    """``ttl_ms`` 0 disables the cache."""

    ttl_ms: int
    model_version: str

    @property
    def enabled(self) -> bool:
        return self.ttl_ms > 0


class EmbeddingResultCache:
    def __init__(self, store: EmbeddingCache, policy: EmbeddingCachePolicy) -> None:
        self._store = store
        self._policy = policy

    @property
    def enabled(self) -> bool:
        return self._policy.enabled

    def key_for(self, model: str, text: str) -> str:
        digest = hashlib.sha256()
        for part in (self._policy.model_version, model, text):
            encoded = part.encode()
            digest.update(len(encoded).to_bytes(8, "big"))
            digest.update(encoded)
        return digest.hexdigest()

    async def lookup(self, tenant_id: str, key: str) -> dict[str, Any] | None:
        """The cached result (SessionEvent completed ``result`` data), or None. A cache that
        cannot be reached is a miss: the work then goes downstream as usual."""
        try:
            raw = await self._store.get_result(tenant_id, key)
        except Unavailable as exc:
            log.warning("embedding cache unavailable, calling the service: %s", exc)
            return None
        if raw is None:
            return None
        result = json.loads(raw)
        return result if isinstance(result, dict) else None

    async def fill(self, tenant_id: str, key: str, result: Mapping[str, Any]) -> None:
        """Cache a completed job's result; failures are logged, never raised (the notice that
        carried it has been applied already)."""
        try:
            await self._store.put_result(
                tenant_id, key, json.dumps(result, separators=(",", ":")), self._policy.ttl_ms
            )
        except Unavailable as exc:
            log.warning("embedding result not cached: %s", exc)

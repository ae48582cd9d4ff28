"""API key records as stores keep them, and the key store (registry.api_keys_redis on Redis,
registry.api_keys_memory in memory). The rules over keys live in domain.api_keys."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from domain.identity import Role
from domain.models import Page, Service


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored key: who it identifies, and the hash of its secret (never the secret).

    ``services`` are the services a service key speaks for (domain.identity.Caller); empty
    on a legacy service key (it speaks for all) and on client and admin keys. A record stored
    before service identities existed reads with none."""

    key_id: str
    tenant_id: str
    role: Role
    description: str
    secret_sha256: str
    created_at_ms: int = 0
    revoked_at_ms: int | None = None
    services: frozenset[Service] = frozenset()

    @property
    def revoked(self) -> bool:
        return self.revoked_at_ms is not None


class ApiKeyStore(Protocol):
    """API key records of all tenants, by key id, with a per-tenant listing. Stores never see
    a plaintext secret, only its hash (domain.api_keys)."""

    async def add_key(self, key: ApiKey) -> ApiKey | None:
        """Store a new key, stamping its creation time; None (and no change) when a key with
        that id exists already."""
        ...

    async def get_key(self, key_id: str) -> ApiKey | None:
        """The key with this id (revoked or not), or None."""
        ...

    async def get_keys(self, key_ids: Sequence[str]) -> list[ApiKey | None]:
        """The keys with these ids, in the same order (None where missing), in one read."""
        ...

    async def list_keys(self, tenant_id: str, *, limit: int, after: str | None) -> Page[ApiKey]:
        """Up to ``limit`` of the tenant's keys in ascending key id order, strictly after the
        key id ``after``. ``next_cursor`` is the id to pass as ``after`` for the next page."""
        ...

    async def revoke_key(self, key_id: str) -> ApiKey | None:
        """Mark a key revoked (keeping the first revocation time) and return it; None when
        missing."""

"""Deterministic API keys for tests, accepted by every server that tests start in-process.

``api_key_for(tenant_id, role)`` is ``ao_test<r><hex(tenant_id)>_<secret>``: the key id
spells the role (c, s or a) and the tenant id in hex, and the secret is an HMAC of the key id
under a fixed test seed. ``TestKeyStore`` wraps a server's real key store and answers lookups of
such ids by deriving the record, so any tenant name works without setup, on both backends,
while keys created through AdminService go to the real store as in production.

Production servers never wrap their store: these keys only work where a test built the server
through tests.support.servers.running_server.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence

from domain.api_keys import format_key, hash_secret
from domain.identity import Role
from domain.ids import is_tenant_id
from domain.models import Page
from domain.ports.api_keys import ApiKey, ApiKeyStore

TEST_KEY_PREFIX = "test"
_SEED = b"agent-orchestrator tests only"
_ROLE_CODES = {Role.CLIENT: "c", Role.SERVICE: "s", Role.ADMIN: "a"}
_CODE_ROLES = {code: role for role, code in _ROLE_CODES.items()}


def key_id_for(tenant_id: str, role: Role) -> str:
    return f"{TEST_KEY_PREFIX}{_ROLE_CODES[role]}{tenant_id.encode().hex()}"


def _secret(key_id: str) -> str:
    digest = hmac.new(_SEED, key_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def api_key_for(tenant_id: str, role: Role) -> str:
    """The plaintext test key for a tenant and role."""
    key_id = key_id_for(tenant_id, role)
    return format_key(key_id, _secret(key_id))


def derived_record(key_id: str) -> ApiKey | None:
    """The record of a test key id, or None when ``key_id`` is not one."""
    if not key_id.startswith(TEST_KEY_PREFIX) or len(key_id) < len(TEST_KEY_PREFIX) + 2:
        return None
    role = _CODE_ROLES.get(key_id[len(TEST_KEY_PREFIX)])
    try:
        tenant_id = bytes.fromhex(key_id[len(TEST_KEY_PREFIX) + 1 :]).decode()
    except (ValueError, binascii.Error):
        return None
    if role is None or not is_tenant_id(tenant_id):
        return None
    return ApiKey(key_id, tenant_id, role, "test key", hash_secret(_secret(key_id)), 1)


class TestKeyStore:
    """domain.ports.api_keys.ApiKeyStore: the real store plus every derived test key."""

    __test__ = False  # not a test class

    def __init__(self, inner: ApiKeyStore) -> None:
        self.inner = inner

    async def add_key(self, key: ApiKey) -> ApiKey | None:
        return await self.inner.add_key(key)

    async def get_key(self, key_id: str) -> ApiKey | None:
        derived = derived_record(key_id)
        return derived if derived is not None else await self.inner.get_key(key_id)

    async def get_keys(self, key_ids: Sequence[str]) -> list[ApiKey | None]:
        found = await self.inner.get_keys(key_ids)
        return [
            derived if (derived := derived_record(key_id)) is not None else record
            for key_id, record in zip(key_ids, found, strict=True)
        ]

    async def list_keys(self, tenant_id: str, *, limit: int, after: str | None) -> Page[ApiKey]:
        return await self.inner.list_keys(tenant_id, limit=limit, after=after)

    async def revoke_key(self, key_id: str) -> ApiKey | None:
        return await self.inner.revoke_key(key_id)

"""API keys in Redis.

Layout (see registry.keys): one hash per key id (``{k:<key_id>}`` hash tag, since calls look a
key up by id alone), a per-tenant index sorted set and a per-tenant set of revoked key ids under
the tenant's hash tag (the index and the revoked set are what the rate-limit script checks on
every call: registry.redis_rate_limiter). A key is
written hash first, index second, so a listed id always has its record; an index entry whose
record is missing (a crash between the two writes) is skipped and pruned when listed. Scripts
take the time from Redis. A revocation is written to the tenant's revoked set first, then to
the record; every replica sees it at its next call (its key check runs in the rate-limit script).
"""

from __future__ import annotations

from collections.abc import Sequence

from domain.errors import DataLoss
from domain.identity import Role
from domain.models import Page, Service
from domain.ports.api_keys import ApiKey
from registry.redis_client import RedisStore, pairs_to_dict, redis_errors_as_unavailable


def encode_services(services: frozenset[Service]) -> str:
    """The ``services`` field: the values comma-separated in a fixed order ("" for none)."""
    return ",".join(sorted(service.value for service in services))


def decode_services(key_id: str, text: str) -> frozenset[Service]:
    """A ``services`` field; a record written before the field existed has none (legacy). A
    value this release does not know fails closed (DataLoss), never widening the key to a
    legacy one."""
    try:
        return frozenset(Service(value) for value in text.split(",") if value)
    except ValueError:
        raise DataLoss(f"API key {key_id} names a service this release does not know") from None


def key_from_hash(key_id: str, fields: dict[str, str]) -> ApiKey:
    revoked = fields.get("revoked", "")
    return ApiKey(
        key_id=key_id,
        tenant_id=fields["tenant"],
        role=Role(fields["role"]),
        description=fields["desc"],
        secret_sha256=fields["hash"],
        created_at_ms=int(fields["created"]),
        revoked_at_ms=int(revoked) if revoked else None,
        services=decode_services(key_id, fields.get("services", "")),
    )


class RedisApiKeyStore(RedisStore):
    """domain.ports.api_keys.ApiKeyStore on Redis."""

    SCRIPTS = "api_keys"

    async def add_key(self, key: ApiKey) -> ApiKey | None:
        with redis_errors_as_unavailable():
            raw = await self._scripts.run(
                "add",
                keys=[self._keys.api_key(key.key_id)],
                args=[
                    key.tenant_id,
                    key.role.value,
                    key.description,
                    key.secret_sha256,
                    encode_services(key.services),
                ],
            )
            if not raw:
                return None
            await self._redis.zadd(self._keys.api_key_index(key.tenant_id), {key.key_id: 0})
        return key_from_hash(key.key_id, pairs_to_dict(raw))

    async def get_key(self, key_id: str) -> ApiKey | None:
        with redis_errors_as_unavailable():
            fields = await self._redis.hgetall(self._keys.api_key(key_id))
        return key_from_hash(key_id, pairs_to_dict(fields)) if fields else None

    async def get_keys(self, key_ids: Sequence[str]) -> list[ApiKey | None]:
        if not key_ids:
            return []
        with redis_errors_as_unavailable():
            pipe = self._redis.pipeline(transaction=False)
            for key_id in key_ids:
                pipe.hgetall(self._keys.api_key(key_id))
            replies = await pipe.execute()
        return [
            key_from_hash(key_id, pairs_to_dict(fields)) if fields else None
            for key_id, fields in zip(key_ids, replies, strict=True)
        ]

    async def list_keys(self, tenant_id: str, *, limit: int, after: str | None) -> Page[ApiKey]:
        index = self._keys.api_key_index(tenant_id)
        found: list[ApiKey] = []
        cursor = after
        with redis_errors_as_unavailable():
            while True:
                start = f"({cursor}" if cursor else "-"
                want = limit - len(found) + 1  # one more tells whether a next page exists
                ids = [
                    str(key_id)
                    for key_id in await self._redis.zrange(
                        index, start, "+", bylex=True, offset=0, num=want
                    )
                ]
                if not ids:
                    return Page(found, None)
                pipe = self._redis.pipeline(transaction=False)
                for key_id in ids:
                    pipe.hgetall(self._keys.api_key(key_id))
                replies = await pipe.execute()
                vanished: list[str] = []
                for key_id, fields in zip(ids, replies, strict=True):
                    if not fields:
                        vanished.append(key_id)
                        continue
                    if len(found) == limit:
                        return Page(found, found[-1].key_id)
                    found.append(key_from_hash(key_id, pairs_to_dict(fields)))
                if vanished:
                    await self._redis.zrem(index, *vanished)
                cursor = ids[-1]
                if len(ids) < want:
                    return Page(found, None)

    async def revoke_key(self, key_id: str) -> ApiKey | None:
        key_hash = self._keys.api_key(key_id)
        with redis_errors_as_unavailable():
            tenant = await self._redis.hget(key_hash, "tenant")
            if tenant is None:
                return None
            # The tenant's revoked set first (what the rate-limit script checks on every call):
            # a crash before the record is marked leaves the key refused, and revoking it again
            # completes the record.
            await self._redis.sadd(self._keys.revoked_api_keys(str(tenant)), key_id)
            raw = await self._scripts.run("revoke", keys=[key_hash])
        return key_from_hash(key_id, pairs_to_dict(raw)) if raw else None

"""The ApiKeyStore contract: the Redis and in-memory backends must pass every test here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from redis.asyncio import Redis

from domain.api_keys import hash_secret
from domain.errors import DataLoss
from domain.identity import Role
from domain.models import Service
from domain.ports.api_keys import ApiKey, ApiKeyStore
from registry.backend import BackendConfig, open_backend


@pytest.fixture
async def store(backend_url: str | None) -> AsyncIterator[ApiKeyStore]:
    registry = open_backend(
        BackendConfig(redis_url=backend_url, key_prefix="test", session_retention_ms=1000)
    )
    yield registry.api_keys
    await registry.aclose()


def record(key_id: str, tenant: str = "acme", role: Role = Role.CLIENT) -> ApiKey:
    return ApiKey(key_id, tenant, role, f"key {key_id}", hash_secret(f"secret-{key_id}"))


async def test_added_key_reads_back_with_a_creation_time(store: ApiKeyStore) -> None:
    added = await store.add_key(record("k0001", role=Role.SERVICE))
    assert added is not None
    assert added.created_at_ms > 0
    assert added.revoked_at_ms is None
    read = await store.get_key("k0001")
    assert read == added
    assert (read.tenant_id, read.role, read.description) == ("acme", Role.SERVICE, "key k0001")
    assert read.secret_sha256 == hash_secret("secret-k0001")


async def test_an_existing_id_is_not_overwritten(store: ApiKeyStore) -> None:
    await store.add_key(record("k0001"))
    assert await store.add_key(record("k0001", tenant="globex")) is None
    read = await store.get_key("k0001")
    assert read is not None and read.tenant_id == "acme"


async def test_unknown_key_is_none(store: ApiKeyStore) -> None:
    assert await store.get_key("nope0000") is None
    assert await store.revoke_key("nope0000") is None


async def test_revoke_marks_the_key_once(store: ApiKeyStore) -> None:
    await store.add_key(record("k0001"))
    revoked = await store.revoke_key("k0001")
    assert revoked is not None and revoked.revoked
    again = await store.revoke_key("k0001")
    assert again is not None and again.revoked_at_ms == revoked.revoked_at_ms
    read = await store.get_key("k0001")
    assert read is not None and read.revoked


async def test_get_keys_reads_several_keys_in_order_with_none_for_missing(
    store: ApiKeyStore,
) -> None:
    await store.add_key(record("k0001"))
    await store.add_key(record("k0002"))
    await store.revoke_key("k0002")
    found = await store.get_keys(["k0002", "nope0000", "k0001"])
    assert [k.key_id if k else None for k in found] == ["k0002", None, "k0001"]
    assert [k.revoked if k else None for k in found] == [True, None, False]
    assert await store.get_keys([]) == []


async def test_list_is_per_tenant_in_id_order_with_pages(store: ApiKeyStore) -> None:
    for key_id in ("k0003", "k0001", "k0005", "k0002", "k0004"):
        await store.add_key(record(key_id))
    await store.add_key(record("k0000", tenant="globex"))
    first = await store.list_keys("acme", limit=2, after=None)
    assert [k.key_id for k in first.items] == ["k0001", "k0002"]
    assert first.next_cursor == "k0002"
    second = await store.list_keys("acme", limit=2, after=first.next_cursor)
    assert [k.key_id for k in second.items] == ["k0003", "k0004"]
    last = await store.list_keys("acme", limit=2, after=second.next_cursor)
    assert [k.key_id for k in last.items] == ["k0005"]
    assert last.next_cursor is None
    exact = await store.list_keys("acme", limit=5, after=None)
    assert len(exact.items) == 5 and exact.next_cursor is None
    assert [k.key_id for k in (await store.list_keys("globex", limit=10, after=None)).items] == [
        "k0000"
    ]
    assert (await store.list_keys("initech", limit=10, after=None)).items == []


async def test_revoked_keys_stay_listed(store: ApiKeyStore) -> None:
    await store.add_key(record("k0001"))
    await store.revoke_key("k0001")
    listed = await store.list_keys("acme", limit=10, after=None)
    assert [k.revoked for k in listed.items] == [True]


async def test_redis_listing_skips_and_prunes_index_entries_without_a_record(
    redis_url: str,
) -> None:
    """A crash between the record and the index write leaves an index entry alone."""
    registry = open_backend(
        BackendConfig(redis_url=redis_url, key_prefix="test", session_retention_ms=1000)
    )
    try:
        for key_id in ("k0001", "k0003"):
            await registry.api_keys.add_key(record(key_id))
        raw = Redis.from_url(redis_url, decode_responses=True)
        await raw.zadd("test:{t:acme}:apikeys", {"k0002": 0})
        first = await registry.api_keys.list_keys("acme", limit=1, after=None)
        second = await registry.api_keys.list_keys("acme", limit=1, after=first.next_cursor)
        assert [k.key_id for k in (*first.items, *second.items)] == ["k0001", "k0003"]
        assert second.next_cursor is None
        assert await raw.zrange("test:{t:acme}:apikeys", 0, -1) == ["k0001", "k0003"]
        await raw.aclose()
    finally:
        await registry.aclose()


async def test_a_service_key_keeps_the_services_it_speaks_for(store: ApiKeyStore) -> None:
    speaks = frozenset({Service.QUERY, Service.AGENT_EXECUTION})
    added = await store.add_key(replace(record("k0001", role=Role.SERVICE), services=speaks))
    assert added is not None and added.services == speaks
    read = await store.get_key("k0001")
    assert read is not None and read.services == speaks
    (listed,) = (await store.list_keys("acme", limit=10, after=None)).items
    assert listed.services == speaks
    revoked = await store.revoke_key("k0001")
    assert revoked is not None and revoked.services == speaks


async def test_a_key_stored_without_services_reads_as_legacy(store: ApiKeyStore) -> None:
    await store.add_key(record("k0001", role=Role.SERVICE))
    read = await store.get_key("k0001")
    assert read is not None and read.services == frozenset()


async def test_a_redis_record_from_before_service_identities_reads_as_legacy(
    redis_url: str,
) -> None:
    registry = open_backend(
        BackendConfig(redis_url=redis_url, key_prefix="test", session_retention_ms=1000)
    )
    raw = Redis.from_url(redis_url, decode_responses=True)
    try:
        # The fields an earlier release wrote: no "services".
        await raw.hset(
            "test:apikey:{k:old00001}",
            mapping={
                "tenant": "platform",
                "role": "service",
                "desc": "old",
                "hash": hash_secret("s"),
                "created": "1",
                "revoked": "",
            },
        )
        read = await registry.api_keys.get_key("old00001")
        assert read is not None and read.role is Role.SERVICE and read.services == frozenset()
    finally:
        await raw.aclose()
        await registry.aclose()


async def test_a_redis_record_naming_an_unknown_service_fails_closed(redis_url: str) -> None:
    """A service this release does not know never widens the key to a legacy one."""
    registry = open_backend(
        BackendConfig(redis_url=redis_url, key_prefix="test", session_retention_ms=1000)
    )
    raw = Redis.from_url(redis_url, decode_responses=True)
    try:
        await registry.api_keys.add_key(record("k0001", role=Role.SERVICE))
        await raw.hset("test:apikey:{k:k0001}", "services", "teleport")
        with pytest.raises(DataLoss):
            await registry.api_keys.get_key("k0001")
    finally:
        await raw.aclose()
        await registry.aclose()

"""API key rules: format, hashing, validation, verification and revocation (memory store)."""

from __future__ import annotations

import pytest

from domain.api_keys import ApiKeyManager, format_key, hash_secret, parse_key, record_for_plaintext
from domain.errors import InvalidArgument, NotFound, Unauthenticated
from domain.identity import Role
from registry.api_keys_memory import MemoryApiKeyStore


@pytest.fixture
def keys() -> ApiKeyManager:
    return ApiKeyManager(MemoryApiKeyStore())


def test_keys_parse_into_id_and_secret_even_with_underscores_in_the_secret() -> None:
    assert parse_key("ao_abcd1234_se_cr-et_0123456789") == ("abcd1234", "se_cr-et_0123456789")
    assert format_key("abcd1234", "s" * 20) == "ao_abcd1234_" + "s" * 20


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abcd1234_" + "s" * 20,
        "ao_abcd1234",
        "ao_ab_" + "s" * 20,
        "ao_abcd1234_short",
        "ao_abcd1234_" + "s" * 19 + "!",
        "ao_abc-1234_" + "s" * 20,
    ],
)
def test_malformed_keys_are_unauthenticated(text: str) -> None:
    with pytest.raises(Unauthenticated):
        parse_key(text)


async def test_created_keys_have_a_random_id_and_a_43_char_secret(keys: ApiKeyManager) -> None:
    first = await keys.create("acme", "client", "first")
    second = await keys.create("acme", "client", "second")
    key_id, secret = parse_key(first.api_key)
    assert key_id == first.record.key_id and len(key_id) == 16
    assert len(secret) == 43
    assert first.record.secret_sha256 == hash_secret(secret)
    assert secret not in repr(first.record)
    assert first.record.key_id != second.record.key_id


async def test_verify_returns_the_record_of_a_live_key(keys: ApiKeyManager) -> None:
    issued = await keys.create("acme", "service", "")
    record = await keys.verify(issued.api_key)
    assert (record.tenant_id, record.role, record.key_id) == (
        "acme",
        Role.SERVICE,
        issued.record.key_id,
    )


async def test_verify_refuses_unknown_wrong_and_revoked_keys(keys: ApiKeyManager) -> None:
    issued = await keys.create("acme", "client", "")
    key_id, secret = parse_key(issued.api_key)
    with pytest.raises(Unauthenticated):
        await keys.verify(format_key("ffffffffffffffff", secret))
    with pytest.raises(Unauthenticated):
        await keys.verify(format_key(key_id, secret[::-1]))
    await keys.revoke(key_id)
    with pytest.raises(Unauthenticated):
        await keys.verify(issued.api_key)


async def test_a_key_verified_before_is_still_checked_against_the_store(
    keys: ApiKeyManager,
) -> None:
    issued = await keys.create("acme", "client", "")
    key_id, secret = parse_key(issued.api_key)
    for _ in range(2):  # the second call uses the remembered id and digest
        assert (await keys.verify(issued.api_key)).key_id == key_id
    with pytest.raises(Unauthenticated):
        await keys.verify(format_key(key_id, secret[::-1]))
    assert (await keys.verify(issued.api_key)).key_id == key_id
    await keys.revoke(key_id)
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            await keys.verify(issued.api_key)


@pytest.mark.parametrize(
    ("tenant_id", "role", "description", "field"),
    [
        ("", "client", "", "tenant_id"),
        ("a{b}", "client", "", "tenant_id"),
        ("acme", "root", "", "role"),
        ("acme", "", "", "role"),
        ("acme", "client", "x" * 257, "description"),
    ],
)
async def test_create_validates(
    keys: ApiKeyManager, tenant_id: str, role: str, description: str, field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await keys.create(tenant_id, role, description)
    assert [v.field for v in caught.value.violations] == [field]


async def test_revoke_validates_and_reports_unknown_keys(keys: ApiKeyManager) -> None:
    with pytest.raises(InvalidArgument):
        await keys.revoke("")
    with pytest.raises(InvalidArgument):
        await keys.revoke("not a key id")
    with pytest.raises(NotFound):
        await keys.revoke("0123456789abcdef")


async def test_list_pages_with_opaque_tokens_bound_to_the_tenant(keys: ApiKeyManager) -> None:
    made = sorted([(await keys.create("acme", "client", "")).record.key_id for _ in range(3)])
    first = await keys.list("acme", 2, "")
    assert [k.key_id for k in first.items] == made[:2]
    assert first.next_cursor is not None
    second = await keys.list("acme", 2, first.next_cursor)
    assert [k.key_id for k in second.items] == made[2:]
    assert second.next_cursor is None
    with pytest.raises(InvalidArgument):
        await keys.list("globex", 2, first.next_cursor)
    with pytest.raises(InvalidArgument):
        await keys.list("acme", 2, "garbage!")
    with pytest.raises(InvalidArgument):
        await keys.list("acme", -1, "")


async def test_ensure_stores_a_configured_key_once(keys: ApiKeyManager) -> None:
    record = record_for_plaintext("ao_fixed0001_" + "s" * 20, "acme", Role.ADMIN, "ops")
    assert await keys.ensure(record)
    assert not await keys.ensure(record)
    assert (await keys.verify("ao_fixed0001_" + "s" * 20)).role is Role.ADMIN

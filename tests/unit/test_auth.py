"""Bearer header parsing, the role each method needs, and authenticate_bearer."""

from __future__ import annotations

import pytest

from domain.api_keys import ApiKeyManager
from domain.errors import PermissionDenied, Unauthenticated
from domain.identity import Caller, Role
from registry.api_keys_memory import MemoryApiKeyStore
from server.auth import (
    DEMO_KEY_IDS,
    Authenticator,
    authenticate_bearer,
    authorize,
    bearer_token,
    required_role,
)
from server.key_seeding import DEMO_KEYS


def test_public_methods_need_no_key() -> None:
    assert required_role("/grpc.health.v1.Health/Check") is None
    assert required_role("/grpc.reflection.v1alpha.ServerReflection/X") is None


@pytest.mark.parametrize(
    ("method", "role"),
    [
        ("/orchestrator.v1.TaskUpdateService/PublishUpdates", Role.SERVICE),
        ("/orchestrator.v1.SessionService/GetSession", Role.CLIENT),
        ("/orchestrator.v1.ChatService/SendMessage", Role.CLIENT),
        ("/orchestrator.v1.BatchService/SubmitBatch", Role.CLIENT),
        ("/orchestrator.admin.v1.AdminService/CreateApiKey", Role.ADMIN),
        ("/some.other.Service/Method", Role.ADMIN),
    ],
)
def test_each_service_family_needs_its_role(method: str, role: Role) -> None:
    assert required_role(method) is role


def test_bearer_tokens_are_read_case_insensitively() -> None:
    assert bearer_token("Bearer ao_x") == "ao_x"
    assert bearer_token("bearer   ao_x ") == "ao_x"


@pytest.mark.parametrize("value", [None, "", "   ", "Bearer", "Bearer ", "Basic abc", "ao_x"])
def test_bad_authorization_values_are_unauthenticated(value: str | None) -> None:
    with pytest.raises(Unauthenticated):
        bearer_token(value)


def test_authorize_needs_the_exact_role() -> None:
    authorize(Caller("acme", Role.CLIENT), Role.CLIENT)
    with pytest.raises(PermissionDenied):
        authorize(Caller("acme", Role.CLIENT), Role.SERVICE)
    with pytest.raises(PermissionDenied):
        authorize(Caller("acme", Role.ADMIN), Role.CLIENT)


async def test_authenticate_bearer_builds_the_caller_from_the_key() -> None:
    keys = ApiKeyManager(MemoryApiKeyStore())
    issued = await keys.create("acme", "service", "")
    caller = await authenticate_bearer(f"Bearer {issued.api_key}", keys)
    assert caller == Caller("acme", Role.SERVICE, issued.record.key_id)
    assert await Authenticator(keys).authenticate_bearer(f"Bearer {issued.api_key}") == caller


async def test_metadata_authentication_ignores_identity_headers() -> None:
    keys = ApiKeyManager(MemoryApiKeyStore())
    issued = await keys.create("acme", "client", "")
    authenticator = Authenticator(keys)
    caller = await authenticator.authenticate_metadata(
        (("x-tenant-id", "globex"), ("authorization", f"Bearer {issued.api_key}")), Role.CLIENT
    )
    assert caller.tenant_id == "acme"
    with pytest.raises(Unauthenticated):
        await authenticator.authenticate_metadata(
            (("x-tenant-id", "acme"), ("x-caller-role", "client")), Role.CLIENT
        )


async def test_a_refused_demo_key_says_where_keys_come_from_when_the_store_has_none() -> None:
    keys = ApiKeyManager(MemoryApiKeyStore())
    authenticator = Authenticator(keys, demo_key_hint=True)
    with pytest.raises(Unauthenticated) as refused:
        await authenticator.authenticate_bearer(f"Bearer {DEMO_KEYS[0].api_key}")
    assert refused.value.message.startswith("invalid or revoked API key: the demo keys exist")
    assert "ORCH_BOOTSTRAP_ADMIN_KEY" in refused.value.message


async def test_other_refused_keys_say_nothing_more() -> None:
    authenticator = Authenticator(ApiKeyManager(MemoryApiKeyStore()), demo_key_hint=True)
    with pytest.raises(Unauthenticated) as refused:
        await authenticator.authenticate_bearer("Bearer ao_somekey01_" + "s" * 30)
    assert refused.value.message == "invalid or revoked API key"


async def test_without_the_hint_a_demo_key_is_refused_plainly() -> None:
    authenticator = Authenticator(ApiKeyManager(MemoryApiKeyStore()))
    with pytest.raises(Unauthenticated) as refused:
        await authenticator.authenticate_bearer(f"Bearer {DEMO_KEYS[0].api_key}")
    assert refused.value.message == "invalid or revoked API key"


def test_the_hinted_key_ids_are_the_demo_keys() -> None:
    assert {demo.api_key.split("_")[1] for demo in DEMO_KEYS} == DEMO_KEY_IDS

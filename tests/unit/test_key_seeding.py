"""Keys stored at start: demo keys and ORCH_API_KEYS_FILE (in-memory registry only) and
ORCH_BOOTSTRAP_ADMIN_KEY (Redis too)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from domain.api_keys import ApiKeyManager, hash_secret
from domain.identity import Role
from domain.models import Service
from orchestrator.admin.v1 import admin_pb2, admin_pb2_grpc
from reference.config import REFERENCE_SERVICES, ReferenceConfig
from registry.api_keys_memory import MemoryApiKeyStore
from server.app import OrchestratorServer
from server.config import Settings, SettingsError
from server.dev_stack import with_publish_key
from server.key_seeding import DEMO_KEYS, load_keys_file, warn_without_keys
from tests.support.servers import bearer, test_settings

PLAIN = "ao_filekey01_" + "p" * 30
HASHED_SECRET = "h" * 30


def write_keys(path: Path, entries: object) -> str:
    path.write_text(json.dumps(entries))
    return str(path)


def test_a_keys_file_takes_plaintext_and_hashed_secrets(tmp_path: Path) -> None:
    path = write_keys(
        tmp_path / "keys.json",
        {
            "keys": [
                {"api_key": PLAIN, "tenant_id": "acme", "role": "client"},
                {
                    "key_id": "filekey02",
                    "secret_sha256": hash_secret(HASHED_SECRET),
                    "tenant_id": "platform",
                    "role": "service",
                    "description": "billing",
                },
            ]
        },
    )
    first, second = load_keys_file(path)
    assert (first.key_id, first.tenant_id, first.role) == ("filekey01", "acme", Role.CLIENT)
    assert first.secret_sha256 == hash_secret("p" * 30)
    assert (second.key_id, second.role, second.description) == (
        "filekey02",
        Role.SERVICE,
        "billing",
    )


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "expected"),
        ({"keys": [{"tenant_id": "acme", "role": "client"}]}, "missing"),
        ({"keys": [{"api_key": PLAIN, "tenant_id": "acme", "role": "root"}]}, "root"),
        ({"keys": [{"api_key": "nope", "tenant_id": "acme", "role": "client"}]}, "api_key"),
        (
            {
                "keys": [
                    {"api_key": PLAIN, "tenant_id": "a", "role": "client", "services": ["query"]}
                ]
            },
            "only a service key",
        ),
        (
            {"keys": [{"api_key": PLAIN, "tenant_id": "a", "role": "service", "services": ["x"]}]},
            r"services\[0\]",
        ),
        (
            {
                "keys": [
                    {"api_key": PLAIN, "tenant_id": "a", "role": "service", "services": "query"}
                ]
            },
            "list of service names",
        ),
        (
            {"keys": [{"key_id": "k1", "secret_sha256": "00", "tenant_id": "a", "role": "admin"}]},
            "key_id",
        ),
        (
            {
                "keys": [
                    {"key_id": "key1", "secret_sha256": "zz", "tenant_id": "a", "role": "admin"}
                ]
            },
            "secret_sha256",
        ),
    ],
)
def test_bad_keys_files_are_settings_errors(tmp_path: Path, document: object, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_keys_file(write_keys(tmp_path / "keys.json", document))


def test_a_keys_file_service_key_may_name_its_services(tmp_path: Path) -> None:
    entry = {"api_key": PLAIN, "tenant_id": "platform", "role": "service"}
    path = write_keys(
        tmp_path / "keys.json",
        {"keys": [{**entry, "services": ["query", "embedding"]}]},
    )
    (record,) = load_keys_file(path)
    assert record.services == frozenset({Service.QUERY, Service.EMBEDDING})
    (legacy,) = load_keys_file(write_keys(tmp_path / "legacy.json", {"keys": [entry]}))
    assert legacy.services == frozenset()


def test_the_demo_service_key_speaks_for_every_reference_service() -> None:
    (demo,) = [key for key in DEMO_KEYS if key.role is Role.SERVICE]
    assert {service.value for service in demo.services} == set(REFERENCE_SERVICES)


def test_an_unreadable_keys_file_is_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError):
        load_keys_file(str(tmp_path / "missing.json"))


def test_keys_files_are_for_the_in_memory_registry_only() -> None:
    with pytest.raises(SettingsError, match="in-memory"):
        Settings.from_env({"REDIS_URL": "redis://x", "ORCH_API_KEYS_FILE": "/k.json"})


def test_the_bootstrap_key_must_look_like_a_key() -> None:
    with pytest.raises(SettingsError, match="ORCH_BOOTSTRAP_ADMIN_KEY"):
        Settings.from_env({"ORCH_BOOTSTRAP_ADMIN_KEY": "secret"})


async def list_keys(server: OrchestratorServer, api_key: str, tenant_id: str) -> list[str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        reply = await admin_pb2_grpc.AdminServiceStub(channel).ListApiKeys(
            admin_pb2.ListApiKeysRequest(tenant_id=tenant_id), metadata=(bearer(api_key),)
        )
    return [k.key_id for k in reply.keys]


async def test_the_embedded_default_seeds_demo_keys_and_the_keys_file(tmp_path: Path) -> None:
    admin_key = "ao_fileadmin_" + "a" * 30
    path = write_keys(
        tmp_path / "keys.json",
        {"keys": [{"api_key": admin_key, "tenant_id": "ops", "role": "admin"}]},
    )
    server = OrchestratorServer(test_settings(None, api_keys_file=path))
    await server.start()
    try:
        demo_admin = next(k for k in DEMO_KEYS if k.role is Role.ADMIN)
        assert await list_keys(server, demo_admin.api_key, "demo") == ["democlient"]
        assert await list_keys(server, admin_key, "ops") == ["fileadmin"]
    finally:
        await server.stop(grace=0)


async def test_demo_keys_can_be_disabled() -> None:
    server = OrchestratorServer(test_settings(None, demo_keys=False))
    await server.start()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_keys(server, DEMO_KEYS[-1].api_key, "demo")
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop(grace=0)


async def test_redis_gets_the_bootstrap_admin_key_but_no_demo_keys(redis_url: str) -> None:
    bootstrap = "ao_bootstrap01_" + "b" * 43
    settings = test_settings(redis_url, bootstrap_admin_key=bootstrap)
    for _ in range(2):  # a restart keeps the stored key and does not fail
        server = OrchestratorServer(settings)
        await server.start()
        try:
            assert await list_keys(server, bootstrap, "platform") == ["bootstrap01"]
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await list_keys(server, DEMO_KEYS[-1].api_key, "demo")
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await server.stop(grace=0)


async def test_make_run_on_redis_mints_a_service_key_for_the_services_it_embeds(
    redis_url: str,
) -> None:
    server = OrchestratorServer(test_settings(redis_url))
    await server.start()
    try:
        config = ReferenceConfig(orchestrator_address=f"127.0.0.1:{server.port}")
        minted, key_id = await with_publish_key(server, config)
        assert key_id is not None
        record = await server.api_keys.verify(minted.publish_metadata[0][1].removeprefix("Bearer "))
        assert record.role is Role.SERVICE and record.key_id == key_id
        assert {service.value for service in record.services} == set(REFERENCE_SERVICES)
    finally:
        await server.stop(grace=0)


def test_the_bootstrap_service_key_must_look_like_a_key() -> None:
    with pytest.raises(SettingsError, match="ORCH_BOOTSTRAP_SERVICE_KEY"):
        Settings.from_env({"ORCH_BOOTSTRAP_SERVICE_KEY": "secret"})


async def test_redis_gets_the_bootstrap_service_key_as_a_platform_service_key(
    redis_url: str,
) -> None:
    admin = "ao_bootstrap02_" + "a" * 43
    service = "ao_bootservice02_" + "s" * 43
    settings = test_settings(redis_url, bootstrap_admin_key=admin, bootstrap_service_key=service)
    for _ in range(2):  # a restart keeps the stored key and does not fail
        server = OrchestratorServer(settings)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                reply = await admin_pb2_grpc.AdminServiceStub(channel).ListApiKeys(
                    admin_pb2.ListApiKeysRequest(tenant_id="platform"), metadata=(bearer(admin),)
                )
            roles = {k.key_id: k.role for k in reply.keys}
            assert roles["bootservice02"] == admin_pb2.API_KEY_ROLE_SERVICE
        finally:
            await server.stop(grace=0)


async def test_a_shared_registry_without_platform_keys_or_bootstrap_key_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    keys = ApiKeyManager(MemoryApiKeyStore())
    assert await warn_without_keys(test_settings(None), keys, in_memory=False)
    assert "ORCH_BOOTSTRAP_ADMIN_KEY is not set" in caplog.text


async def test_no_warning_once_tenant_platform_has_a_key() -> None:
    keys = ApiKeyManager(MemoryApiKeyStore())
    await keys.create("platform", "admin", "")
    assert not await warn_without_keys(test_settings(None), keys, in_memory=False)


async def test_no_warning_with_a_bootstrap_key_or_in_memory() -> None:
    keys = ApiKeyManager(MemoryApiKeyStore())
    boot = test_settings(None, bootstrap_admin_key="ao_bootkey01_" + "b" * 30)
    assert not await warn_without_keys(boot, keys, in_memory=False)
    assert not await warn_without_keys(test_settings(None), keys, in_memory=True)

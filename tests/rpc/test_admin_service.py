"""AdminService over a real server: create, list and revoke API keys; revocation reaches every
replica sharing one Redis at the next call."""

from __future__ import annotations

import grpc
import pytest

from orchestrator.admin.v1 import admin_pb2, admin_pb2_grpc
from orchestrator.v1 import session_pb2, session_pb2_grpc
from tests.support.servers import (
    RunningServer,
    admin,
    bearer,
    running_server,
    tenant,
    test_settings,
)

CLIENT = admin_pb2.API_KEY_ROLE_CLIENT
SERVICE = admin_pb2.API_KEY_ROLE_SERVICE


def admin_stub(server: RunningServer) -> admin_pb2_grpc.AdminServiceAsyncStub:
    return admin_pb2_grpc.AdminServiceStub(server.channel)


async def create_key(
    server: RunningServer, tenant_id: str = "acme", role: int = CLIENT, description: str = ""
) -> admin_pb2.CreateApiKeyResponse:
    return await admin_stub(server).CreateApiKey(
        admin_pb2.CreateApiKeyRequest(
            tenant_id=tenant_id,
            role=role,  # type: ignore[arg-type]
            description=description,
        ),
        metadata=admin(),
    )


async def create_session(server: RunningServer, api_key: str) -> session_pb2.Session:
    stub = session_pb2_grpc.SessionServiceStub(server.channel)
    reply = await stub.CreateSession(
        session_pb2.CreateSessionRequest(agent_id="a"), metadata=(bearer(api_key),)
    )
    return reply.session


async def test_a_created_key_authenticates_as_its_tenant(server: RunningServer) -> None:
    created = await create_key(server, description="billing backend")
    assert created.api_key.startswith(f"ao_{created.key_id}_")
    assert created.key.key_id == created.key_id
    assert created.key.tenant_id == "acme"
    assert created.key.role == CLIENT
    assert created.key.description == "billing backend"
    assert created.key.create_time.seconds > 0
    assert not created.key.revoked and not created.key.HasField("revoke_time")
    session = await create_session(server, created.api_key)
    # The session belongs to acme: acme's test client key reads it.
    stub = session_pb2_grpc.SessionServiceStub(server.channel)
    await stub.GetSession(
        session_pb2.GetSessionRequest(session_id=session.session_id), metadata=tenant("acme")
    )


async def test_a_created_service_key_cannot_use_sessions(server: RunningServer) -> None:
    created = await create_key(server, role=SERVICE)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create_session(server, created.api_key)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_list_pages_through_a_tenants_keys(server: RunningServer) -> None:
    made = {(await create_key(server)).key_id for _ in range(5)}
    await create_key(server, tenant_id="globex")
    stub = admin_stub(server)
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListApiKeys(
            admin_pb2.ListApiKeysRequest(tenant_id="acme", page_size=2, page_token=token),
            metadata=admin(),
        )
        assert len(page.keys) <= 2
        seen.extend(k.key_id for k in page.keys)
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(made)


async def test_a_page_token_of_another_tenant_is_refused(server: RunningServer) -> None:
    for _ in range(2):
        await create_key(server)
    stub = admin_stub(server)
    page = await stub.ListApiKeys(
        admin_pb2.ListApiKeysRequest(tenant_id="acme", page_size=1), metadata=admin()
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListApiKeys(
            admin_pb2.ListApiKeysRequest(tenant_id="globex", page_token=page.next_page_token),
            metadata=admin(),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_revoked_keys_are_refused_and_listed_as_revoked(server: RunningServer) -> None:
    created = await create_key(server)
    await create_session(server, created.api_key)
    stub = admin_stub(server)
    revoked = await stub.RevokeApiKey(
        admin_pb2.RevokeApiKeyRequest(key_id=created.key_id), metadata=admin()
    )
    assert revoked.key.revoked and revoked.key.HasField("revoke_time")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create_session(server, created.api_key)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    again = await stub.RevokeApiKey(
        admin_pb2.RevokeApiKeyRequest(key_id=created.key_id), metadata=admin()
    )
    assert again.key.revoke_time == revoked.key.revoke_time
    listed = await stub.ListApiKeys(
        admin_pb2.ListApiKeysRequest(tenant_id="acme"), metadata=admin()
    )
    assert [(k.key_id, k.revoked) for k in listed.keys] == [(created.key_id, True)]


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"tenant_id": "", "role": CLIENT}, "tenant_id"),
        ({"tenant_id": "{bad}", "role": CLIENT}, "tenant_id"),
        ({"tenant_id": "acme"}, "role"),
        ({"tenant_id": "acme", "role": CLIENT, "description": "x" * 257}, "description"),
    ],
)
async def test_create_validates_its_fields(
    server: RunningServer, request_fields: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin_stub(server).CreateApiKey(
            admin_pb2.CreateApiKeyRequest(**request_fields),  # type: ignore[arg-type]
            metadata=admin(),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (caught.value.details() or "")


async def test_revoking_an_unknown_key_is_not_found(server: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin_stub(server).RevokeApiKey(
            admin_pb2.RevokeApiKeyRequest(key_id="0123456789abcdef"), metadata=admin()
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_key_revoked_on_one_replica_is_refused_by_another_at_once(redis_url: str) -> None:
    async with (
        running_server(test_settings(redis_url)) as replica_a,
        running_server(test_settings(redis_url)) as replica_b,
    ):
        created = await create_key(replica_a)
        await create_session(replica_b, created.api_key)  # B accepts A's new key
        await admin_stub(replica_a).RevokeApiKey(
            admin_pb2.RevokeApiKeyRequest(key_id=created.key_id), metadata=admin()
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await create_session(replica_b, created.api_key)  # the very next call
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

"""Bearer API keys and roles over a real server, on both registry backends: every role against
every service family, and every way of not being authenticated."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from domain.identity import Role
from orchestrator.admin.v1 import admin_pb2, admin_pb2_grpc
from orchestrator.v1 import (
    batch_pb2,
    batch_pb2_grpc,
    chat_pb2,
    chat_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    task_update_pb2,
    task_update_pb2_grpc,
)
from tests.support.keys import api_key_for
from tests.support.servers import RunningServer, admin, bearer, service, tenant

Metadata = tuple[tuple[str, str], ...]
OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


async def _no_updates() -> AsyncIterator[task_update_pb2.PublishUpdatesRequest]:
    return
    yield  # an async generator that sends nothing


async def _session(channel: grpc.aio.Channel, metadata: Metadata) -> None:
    stub = session_pb2_grpc.SessionServiceStub(channel)
    await stub.CreateSession(session_pb2.CreateSessionRequest(agent_id="a"), metadata=metadata)


async def _chat(channel: grpc.aio.Channel, metadata: Metadata) -> None:
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    async for _ in stub.SendMessage(chat_pb2.SendMessageRequest(), metadata=metadata):
        pass


async def _batch(channel: grpc.aio.Channel, metadata: Metadata) -> None:
    stub = batch_pb2_grpc.BatchServiceStub(channel)
    await stub.GetBatch(batch_pb2.GetBatchRequest(), metadata=metadata)


async def _task_update(channel: grpc.aio.Channel, metadata: Metadata) -> None:
    stub = task_update_pb2_grpc.TaskUpdateServiceStub(channel)
    await stub.PublishUpdates(_no_updates(), metadata=metadata)


async def _admin(channel: grpc.aio.Channel, metadata: Metadata) -> None:
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    await stub.ListApiKeys(admin_pb2.ListApiKeysRequest(tenant_id="acme"), metadata=metadata)


FAMILIES: dict[str, Callable[[grpc.aio.Channel, Metadata], Awaitable[None]]] = {
    "session": _session,
    "chat": _chat,
    "batch": _batch,
    "task_update": _task_update,
    "admin": _admin,
}
CALLERS: dict[str, Metadata] = {
    "client": tenant("acme"),
    "service": service(),
    "admin": admin(),
}
# Which family each role may call.
ALLOWED = {"client": {"session", "chat", "batch"}, "service": {"task_update"}, "admin": {"admin"}}


async def status_of(server: RunningServer, family: str, metadata: Metadata) -> grpc.StatusCode:
    """The call's status: OK, or the code it failed with."""
    try:
        await FAMILIES[family](server.channel, metadata)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return OK


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("role", sorted(CALLERS))
async def test_each_role_reaches_only_its_own_services(
    server: RunningServer, role: str, family: str
) -> None:
    code = await status_of(server, family, CALLERS[role])
    if family in ALLOWED[role]:
        # Past authentication: the handler answers (OK, or UNIMPLEMENTED for services whose
        # handlers are not built yet, or a validation error).
        assert code not in (UNAUTHENTICATED, DENIED)
    else:
        assert code == DENIED


BAD_CREDENTIALS: dict[str, Metadata] = {
    "no metadata": (),
    "tenant header alone": (("x-tenant-id", "acme"),),
    "tenant and role headers": (("x-tenant-id", "acme"), ("x-caller-role", "service")),
    "unknown key": (bearer("ao_0123456789abcdef_" + "A" * 43),),
    "wrong secret": (bearer(api_key_for("acme", Role.CLIENT)[:-4] + "AAAA"),),
    "not a key": (bearer("hello"),),
    "basic scheme": (("authorization", "Basic dXNlcjpwYXNz"),),
    "empty bearer": (("authorization", "Bearer "),),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("credentials", sorted(BAD_CREDENTIALS))
async def test_missing_or_bad_keys_are_unauthenticated(
    server: RunningServer, credentials: str, family: str
) -> None:
    assert await status_of(server, family, BAD_CREDENTIALS[credentials]) == UNAUTHENTICATED


async def test_the_tenant_comes_from_the_key_not_the_header(server: RunningServer) -> None:
    stub = session_pb2_grpc.SessionServiceStub(server.channel)
    created = await stub.CreateSession(
        session_pb2.CreateSessionRequest(agent_id="a"),
        metadata=(*tenant("acme"), ("x-tenant-id", "globex")),
    )
    read = await stub.GetSession(
        session_pb2.GetSessionRequest(session_id=created.session.session_id),
        metadata=tenant("acme"),
    )
    assert read.session.session_id == created.session.session_id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetSession(
            session_pb2.GetSessionRequest(session_id=created.session.session_id),
            metadata=tenant("globex"),
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_and_reflection_need_no_key(server: RunningServer) -> None:
    health = health_pb2_grpc.HealthStub(server.channel)
    reply = await health.Check(
        health_pb2.HealthCheckRequest(service="orchestrator.v1.SessionService")
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    admin_health = await health.Check(
        health_pb2.HealthCheckRequest(service="orchestrator.admin.v1.AdminService")
    )
    assert admin_health.status == health_pb2.HealthCheckResponse.SERVING

"""A revoked key's open streams end on every replica; failed authentications are logged
(sampled, key id and address, never the secret) and throttled per client address."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from orchestrator.admin.v1 import admin_pb2, admin_pb2_grpc
from orchestrator.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    task_update_pb2,
    task_update_pb2_grpc,
)
from tests.support.downstream import RecordingDispatcher
from tests.support.flow import EOF
from tests.support.processes import ServerProcess
from tests.support.servers import admin, bearer, running_server, tenant, test_settings

Metadata = tuple[tuple[str, str], ...]
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
# How long a revoked key's stream may stay open (the check runs every second by default).
END_WITHIN_S = 5.0


async def create_key(
    channel: grpc.aio.Channel, admin_metadata: Metadata, tenant_id: str, role: Any
) -> tuple[str, Metadata]:
    """(key id, call metadata) of a new key created through AdminService."""
    reply = await admin_pb2_grpc.AdminServiceStub(channel).CreateApiKey(
        admin_pb2.CreateApiKeyRequest(tenant_id=tenant_id, role=role, description="test"),
        metadata=admin_metadata,
        timeout=10,
    )
    return reply.key_id, (bearer(reply.api_key),)


async def revoke(channel: grpc.aio.Channel, admin_metadata: Metadata, key_id: str) -> None:
    await admin_pb2_grpc.AdminServiceStub(channel).RevokeApiKey(
        admin_pb2.RevokeApiKeyRequest(key_id=key_id), metadata=admin_metadata, timeout=10
    )


async def new_session(channel: grpc.aio.Channel, metadata: Metadata) -> str:
    reply = await session_pb2_grpc.SessionServiceStub(channel).CreateSession(
        session_pb2.CreateSessionRequest(agent_id="a"), metadata=metadata, timeout=10
    )
    return str(reply.session.session_id)


def follow(channel: grpc.aio.Channel, session_id: str, metadata: Metadata) -> Any:
    return chat_pb2_grpc.ChatServiceStub(channel).StreamSession(
        chat_pb2.StreamSessionRequest(session_id=session_id), metadata=metadata, timeout=60
    )


async def send_and_see_accepted(
    channel: grpc.aio.Channel, session_id: str, metadata: Metadata, follower: Any
) -> Any:
    """Send a message; returns its open call once ``follower`` has seen the accepted event (so
    the follower's stream is open and registered on its server)."""
    call = chat_pb2_grpc.ChatServiceStub(channel).SendMessage(
        chat_pb2.SendMessageRequest(session_id=session_id, content="hi"),
        metadata=metadata,
        timeout=60,
    )
    seen = await asyncio.wait_for(follower.read(), 10)
    assert seen is not EOF and seen.event.WhichOneof("kind") == "accepted"
    return call


async def _drain(call: Any) -> None:
    while await asyncio.wait_for(call.read(), END_WITHIN_S * 2) is not EOF:
        pass


async def ended_with(call: Any) -> tuple[grpc.StatusCode, str, float]:
    """Read a streaming call to its end: (code, details, seconds it took)."""
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _drain(call)
    return caught.value.code(), caught.value.details() or "", time.monotonic() - started


# -- a revoked key's streams end ----------------------------------------------------------------


@pytest.fixture
def two_replicas(redis_url: str, tmp_path: Path) -> Iterator[tuple[ServerProcess, str]]:
    """Two `orchestrator serve` processes on one Redis, and their bootstrap admin key."""
    admin_key = f"ao_bootstrap_{secrets.token_urlsafe(32)}"
    env = {"REDIS_URL": redis_url, "ORCH_BOOTSTRAP_ADMIN_KEY": admin_key}
    first = ServerProcess(tmp_path / "first.log", **env)
    second = ServerProcess(tmp_path / "second.log", **env)
    try:
        first.start()
        second.start()
        yield first, second, admin_key  # type: ignore[misc]
    finally:
        first.kill()
        second.kill()


async def test_revoking_a_key_on_one_replica_ends_its_stream_on_the_other(
    two_replicas: Any,
) -> None:
    first, second, admin_key = two_replicas
    admin_md: Metadata = (bearer(admin_key),)
    async with (
        grpc.aio.insecure_channel(first.address) as one,
        grpc.aio.insecure_channel(second.address) as other,
    ):
        revoked_id, revoked_md = await create_key(
            one, admin_md, "acme", admin_pb2.API_KEY_ROLE_CLIENT
        )
        _, kept_md = await create_key(one, admin_md, "acme", admin_pb2.API_KEY_ROLE_CLIENT)
        session_id = await new_session(other, revoked_md)
        doomed = follow(other, session_id, revoked_md)
        kept = follow(other, session_id, kept_md)
        send = await send_and_see_accepted(other, session_id, revoked_md, doomed)
        await asyncio.wait_for(kept.read(), 10)  # the same accepted event

        await revoke(one, admin_md, revoked_id)
        code, details, took = await ended_with(doomed)
        assert (code, details) == (UNAUTHENTICATED, "API key revoked")
        assert took < END_WITHIN_S
        send.cancel()  # (no downstream service here: the job may have failed already)

        # Another key's stream on the same session stays open and live.
        again = chat_pb2_grpc.ChatServiceStub(other).SendMessage(
            chat_pb2.SendMessageRequest(session_id=session_id, content="again"),
            metadata=kept_md,
            timeout=60,
        )
        opened: Any = await asyncio.wait_for(again.read(), 10)
        job_id = opened.event.job_id
        while (await asyncio.wait_for(kept.read(), 10)).event.job_id != job_id:
            pass
        again.cancel()
        kept.cancel()


async def _never_sends() -> AsyncIterator[task_update_pb2.PublishUpdatesRequest]:
    await asyncio.Event().wait()
    yield task_update_pb2.PublishUpdatesRequest()


async def test_a_revoked_key_loses_every_kind_of_open_stream_in_memory() -> None:
    settings = test_settings(None, revocation_check_interval=0.2)
    async with running_server(settings, dispatcher=RecordingDispatcher()) as running:
        channel = running.channel
        client_id, client_md = await create_key(
            channel, admin(), "acme", admin_pb2.API_KEY_ROLE_CLIENT
        )
        service_id, service_md = await create_key(
            channel, admin(), "platform", admin_pb2.API_KEY_ROLE_SERVICE
        )
        session_id = await new_session(channel, client_md)
        follower = follow(channel, session_id, client_md)
        send = await send_and_see_accepted(channel, session_id, client_md, follower)
        publishing = task_update_pb2_grpc.TaskUpdateServiceStub(channel).PublishUpdates(
            _never_sends(), metadata=service_md, timeout=60
        )
        await publishing.initial_metadata()
        # It registers right after its key check, which follows the headers; nothing to await.
        async with asyncio.timeout(5):
            while running.server.revocation.streams.count() < 3:  # noqa: ASYNC110
                await asyncio.sleep(0.01)

        await revoke(channel, admin(), client_id)
        await revoke(channel, admin(), service_id)
        for call in (follower, send):
            code, details, took = await ended_with(call)
            assert (code, details) == (UNAUTHENTICATED, "API key revoked")
            assert took < END_WITHIN_S
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(publishing, END_WITHIN_S)
        assert caught.value.code() == UNAUTHENTICATED
        assert caught.value.details() == "API key revoked"
        assert running.server.revocation.streams.count() == 0


# -- failed authentication --------------------------------------------------------------------


def wrong_key(n: int) -> Metadata:
    return (bearer(f"ao_guess{n:04d}_{'s' * 40}"),)


async def get_session(channel: grpc.aio.Channel, metadata: Metadata) -> grpc.StatusCode:
    try:
        await session_pb2_grpc.SessionServiceStub(channel).GetSession(
            session_pb2.GetSessionRequest(session_id="x"), metadata=metadata, timeout=10
        )
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_failed_authentications_are_logged_sampled_with_key_id_never_the_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = test_settings(None, auth_failure_limit=0)  # logging only
    async with running_server(settings) as running:
        with caplog.at_level(logging.WARNING, logger="server.auth_failures"):
            codes = [await get_session(running.channel, wrong_key(n)) for n in range(200)]
    assert set(codes) == {UNAUTHENTICATED}
    lines = [r for r in caplog.records if r.name == "server.auth_failures"]
    assert 1 <= len(lines) <= 10, "one line per failure would let anyone fill the log"
    first = lines[0].getMessage()
    assert "guess0000" in first and "127.0.0.1" in first
    assert all("s" * 40 not in r.getMessage() for r in caplog.records)


async def test_repeated_failures_from_one_address_are_throttled_with_retry_info() -> None:
    settings = test_settings(None, auth_failure_limit=5, auth_failure_window=60.0)
    async with running_server(settings) as running:
        codes = [await get_session(running.channel, wrong_key(n)) for n in range(5)]
        assert codes == [UNAUTHENTICATED] * 5
        stub = session_pb2_grpc.SessionServiceStub(running.channel)
        for metadata in (wrong_key(6), tenant("acme")):  # not even a good key is looked at
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetSession(
                    session_pb2.GetSessionRequest(session_id="x"), metadata=metadata, timeout=10
                )
            error = caught.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            status = rpc_status.from_call(error)  # type: ignore[arg-type]
            assert status is not None
            infos = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
            assert len(infos) == 1
            info = error_details_pb2.RetryInfo()
            infos[0].Unpack(info)
            assert 0 < info.retry_delay.ToMilliseconds() <= 12_000
            trailing: Any = error.trailing_metadata() or ()
            trailers = {str(key): value for key, value in trailing}
            assert int(trailers["retry-after"]) >= 1

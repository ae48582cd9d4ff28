"""SessionService over a real grpc.aio server, on both registry backends."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from orchestrator.v1 import session_pb2, session_pb2_grpc
from tests.support.servers import RunningServer, tenant

if TYPE_CHECKING:
    from orchestrator.v1.session_pb2_grpc import SessionServiceAsyncStub


def stub(server: RunningServer) -> SessionServiceAsyncStub:
    return session_pb2_grpc.SessionServiceStub(server.channel)


async def create(
    server: RunningServer, tenant_id: str = "acme", agent: str = "agent-1", **kwargs: object
) -> session_pb2.Session:
    reply = await stub(server).CreateSession(
        session_pb2.CreateSessionRequest(agent_id=agent, **kwargs),  # type: ignore[arg-type]
        metadata=tenant(tenant_id),
    )
    return reply.session


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "expected rich error details"
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return {v.field: v.description for v in bad.field_violations}
    raise AssertionError("no BadRequest detail")


async def test_create_returns_an_active_session_with_defaults(server: RunningServer) -> None:
    session = await create(server, user_id="u-1", metadata={"channel": "web"})
    assert session.session_id
    assert session.state == session_pb2.SESSION_STATE_ACTIVE
    assert session.agent_id == "agent-1" and session.user_id == "u-1"
    assert dict(session.metadata) == {"channel": "web"}
    assert session.ttl.seconds == 3600
    assert session.expire_time.ToMilliseconds() - session.create_time.ToMilliseconds() == 3_600_000


async def test_create_honours_a_requested_ttl(server: RunningServer) -> None:
    session = await create(server, ttl=duration_pb2.Duration(seconds=90))
    assert session.ttl.seconds == 90


async def test_create_without_agent_id_names_the_field(server: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(server).CreateSession(session_pb2.CreateSessionRequest(), metadata=tenant("a"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "agent_id" in field_violations(caught.value)


async def test_create_rejects_every_bad_field_at_once(server: RunningServer) -> None:
    request = session_pb2.CreateSessionRequest(
        agent_id="x" * 129,
        metadata={"": "empty key"},
        ttl=duration_pb2.Duration(seconds=10 * 365 * 24 * 3600),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(server).CreateSession(request, metadata=tenant("a"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(caught.value)) == {"agent_id", "metadata['']", "ttl"}


async def test_get_round_trips_the_created_session(server: RunningServer) -> None:
    created = await create(server)
    reply = await stub(server).GetSession(
        session_pb2.GetSessionRequest(session_id=created.session_id), metadata=tenant("acme")
    )
    assert reply.session.session_id == created.session_id
    assert reply.session.agent_id == created.agent_id
    assert reply.session.expire_time.ToMilliseconds() >= created.expire_time.ToMilliseconds()


async def test_get_unknown_session_is_not_found(server: RunningServer) -> None:
    created = await create(server)
    unknown = created.session_id[:-4] + "0000"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(server).GetSession(
            session_pb2.GetSessionRequest(session_id=unknown), metadata=tenant("acme")
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_get_malformed_session_id_is_invalid_argument(server: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(server).GetSession(
            session_pb2.GetSessionRequest(session_id="not-an-id"), metadata=tenant("acme")
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "session_id" in field_violations(caught.value)


async def test_another_tenants_session_is_not_found(server: RunningServer) -> None:
    created = await create(server, tenant_id="acme")
    with pytest.raises(grpc.aio.AioRpcError) as get_error:
        await stub(server).GetSession(
            session_pb2.GetSessionRequest(session_id=created.session_id), metadata=tenant("globex")
        )
    assert get_error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as close_error:
        await stub(server).CloseSession(
            session_pb2.CloseSessionRequest(session_id=created.session_id),
            metadata=tenant("globex"),
        )
    assert close_error.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await stub(server).ListSessions(
        session_pb2.ListSessionsRequest(), metadata=tenant("globex")
    )
    assert list(listed.sessions) == []
    own = await stub(server).GetSession(
        session_pb2.GetSessionRequest(session_id=created.session_id), metadata=tenant("acme")
    )
    assert own.session.state == session_pb2.SESSION_STATE_ACTIVE


async def test_call_without_tenant_is_unauthenticated(server: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(server).ListSessions(session_pb2.ListSessionsRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_list_paginates_newest_first(server: RunningServer) -> None:
    created = [await create(server) for _ in range(5)]
    ids: list[str] = []
    token = ""
    while True:
        page = await stub(server).ListSessions(
            session_pb2.ListSessionsRequest(page_size=2, page_token=token), metadata=tenant("acme")
        )
        assert len(page.sessions) <= 2
        ids.extend(s.session_id for s in page.sessions)
        token = page.next_page_token
        if not token:
            break
    assert ids == [s.session_id for s in reversed(created)]


async def test_list_filters_by_state_and_agent(server: RunningServer) -> None:
    alpha = await create(server, agent="alpha")
    await create(server, agent="beta")
    closed = await create(server, agent="alpha")
    await stub(server).CloseSession(
        session_pb2.CloseSessionRequest(session_id=closed.session_id), metadata=tenant("acme")
    )
    page = await stub(server).ListSessions(
        session_pb2.ListSessionsRequest(agent_id="alpha", state=session_pb2.SESSION_STATE_ACTIVE),
        metadata=tenant("acme"),
    )
    assert [s.session_id for s in page.sessions] == [alpha.session_id]


async def test_list_rejects_a_token_from_other_filters(server: RunningServer) -> None:
    for _ in range(3):
        await create(server)
    first = await stub(server).ListSessions(
        session_pb2.ListSessionsRequest(page_size=1), metadata=tenant("acme")
    )
    assert first.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(server).ListSessions(
            session_pb2.ListSessionsRequest(
                page_size=1, page_token=first.next_page_token, agent_id="other"
            ),
            metadata=tenant("acme"),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in field_violations(caught.value)


async def test_list_rejects_garbage_tokens_and_negative_sizes(server: RunningServer) -> None:
    for request, field in (
        (session_pb2.ListSessionsRequest(page_token="garbage!"), "page_token"),
        (session_pb2.ListSessionsRequest(page_size=-1), "page_size"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub(server).ListSessions(request, metadata=tenant("acme"))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(caught.value)


async def test_close_then_close_again_returns_the_closed_session(server: RunningServer) -> None:
    created = await create(server)
    request = session_pb2.CloseSessionRequest(session_id=created.session_id)
    first = await stub(server).CloseSession(request, metadata=tenant("acme"))
    second = await stub(server).CloseSession(request, metadata=tenant("acme"))
    assert first.session.state == session_pb2.SESSION_STATE_CLOSED
    assert second.session == first.session


async def test_close_unknown_session_is_not_found(server: RunningServer) -> None:
    created = await create(server)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(server).CloseSession(
            session_pb2.CloseSessionRequest(session_id=created.session_id[:-4] + "0000"),
            metadata=tenant("acme"),
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_closing_an_expired_session_is_failed_precondition(server: RunningServer) -> None:
    created = await create(server, ttl=duration_pb2.Duration(seconds=1))
    request = session_pb2.GetSessionRequest(session_id=created.session_id)
    deadline = asyncio.get_running_loop().time() + 5
    while True:  # wait (bounded) for the 1 s TTL to run out; reading without touching
        listed = await stub(server).ListSessions(
            session_pb2.ListSessionsRequest(state=session_pb2.SESSION_STATE_EXPIRED),
            metadata=tenant("acme"),
        )
        if any(s.session_id == created.session_id for s in listed.sessions):
            break
        assert asyncio.get_running_loop().time() < deadline, "session never expired"
        await asyncio.sleep(0.05)
    got = await stub(server).GetSession(request, metadata=tenant("acme"))
    assert got.session.state == session_pb2.SESSION_STATE_EXPIRED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(server).CloseSession(
            session_pb2.CloseSessionRequest(session_id=created.session_id), metadata=tenant("acme")
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION

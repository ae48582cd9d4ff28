"""Requests past a field's bound are INVALID_ARGUMENT naming the field, over a real server (the
full table is walked in tests/unit/test_request_limits.py)."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from orchestrator.v1 import chat_pb2, chat_pb2_grpc, session_pb2, session_pb2_grpc
from tests.support.servers import RunningServer, tenant


def bad_fields(error: grpc.aio.AioRpcError) -> list[str]:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


async def test_a_duration_with_nanos_out_of_range_is_invalid_argument(
    server: RunningServer,
) -> None:
    stub = session_pb2_grpc.SessionServiceStub(server.channel)
    request = session_pb2.CreateSessionRequest(agent_id="a")
    request.ttl.seconds = 600
    request.ttl.nanos = 2_000_000_000
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateSession(request, metadata=tenant("acme"), timeout=10)
    assert bad_fields(caught.value) == ["ttl.nanos"]


async def test_a_one_megabyte_collection_name_is_invalid_argument(server: RunningServer) -> None:
    sessions = session_pb2_grpc.SessionServiceStub(server.channel)
    created = await sessions.CreateSession(
        session_pb2.CreateSessionRequest(agent_id="a"), metadata=tenant("acme"), timeout=10
    )
    call = chat_pb2_grpc.ChatServiceStub(server.channel).SendMessage(
        chat_pb2.SendMessageRequest(
            session_id=created.session.session_id, content="hi", collections=["c" * 1_000_000]
        ),
        metadata=tenant("acme"),
        timeout=10,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert bad_fields(caught.value) == ["collections[0]"]

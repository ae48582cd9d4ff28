"""Bytes that are not a valid request message: every RPC answers INVALID_ARGUMENT without a
traceback in the log; on PublishUpdates such a frame counts as malformed and the stream goes on;
WebSocket JSON nested beyond the limit gets the documented error reply on an open socket.

The RPCs are enumerated from the descriptors of every service the server offers (health and
reflection included), so a new RPC is covered without touching this file."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from orchestrator.v1 import task_update_pb2
from server.app import SERVICE_NAMES
from server.auth import required_role
from tests.support.downstream import RecordingDispatcher
from tests.support.flow import TIMEOUT_S, Flow, completed, kind_of, notice, read_to_end
from tests.support.keys import api_key_for
from tests.support.servers import RunningServer, bearer, running_server, service, test_settings

# A length-delimited field 1 claiming 255 bytes that never come: invalid for every message.
TRUNCATED = b"\x0a\xff\x01only a few bytes"
OFFERED = (
    *SERVICE_NAMES,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)
# PublishUpdates counts a bad frame as a malformed notice instead (tested below), and
# ReportUpdates answers it as one (tests/flow/test_report_updates.py).
PUBLISH_UPDATES = "/orchestrator.v1.TaskUpdateService/PublishUpdates"
REPORT_UPDATES = "/orchestrator.v1.TaskUpdateService/ReportUpdates"


def _methods() -> Iterator[MethodDescriptor]:
    pool = descriptor_pool.Default()
    for name in OFFERED:
        yield from pool.FindServiceByName(name).methods


def _path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def _invalid_utf8(method: MethodDescriptor) -> bytes | None:
    """The request with invalid UTF-8 in its first string field (None if it has none)."""
    for field in method.input_type.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            return bytes([field.number << 3 | 2, 2]) + b"\xff\xfe"
    return None


def _cases() -> Iterator[Any]:
    for method in _methods():
        path = _path(method)
        if path in (PUBLISH_UPDATES, REPORT_UPDATES):
            continue
        yield pytest.param(method, TRUNCATED, id=f"{path}-truncated")
        bad_text = _invalid_utf8(method)
        if bad_text is not None:
            yield pytest.param(method, bad_text, id=f"{path}-invalid-utf8")


def _metadata(path: str) -> tuple[tuple[str, str], ...]:
    role = required_role(path)
    return () if role is None else (bearer(api_key_for("acme", role)),)


def _identity(data: bytes) -> bytes:
    return data


async def _call_raw(channel: grpc.aio.Channel, method: MethodDescriptor, frame: bytes) -> None:
    """Send ``frame`` as the (only) request message and read the whole answer."""
    path = _path(method)
    args: dict[str, Any] = {"request_serializer": _identity, "response_deserializer": _identity}
    metadata = _metadata(path)
    if method.client_streaming and method.server_streaming:
        call = channel.stream_stream(path, **args)(iter([frame]), metadata=metadata)
        async for _ in call:
            pass
    elif method.client_streaming:
        await channel.stream_unary(path, **args)(iter([frame]), metadata=metadata)
    elif method.server_streaming:
        async for _ in channel.unary_stream(path, **args)(frame, metadata=metadata):
            pass
    else:
        await channel.unary_unary(path, **args)(frame, metadata=metadata, timeout=TIMEOUT_S)


def _errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR or r.exc_info is not None
    ]


@pytest.fixture
async def memory_server() -> AsyncIterator[RunningServer]:
    async with running_server(test_settings(None)) as running:
        yield running


@pytest.fixture
async def flow(backend_url: str | None) -> AsyncIterator[Flow]:
    dispatcher = RecordingDispatcher()
    async with running_server(test_settings(backend_url), dispatcher=dispatcher) as running:
        yield Flow(running, dispatcher)


def test_every_offered_rpc_is_covered() -> None:
    """The enumeration really reaches every service (and so every RPC added later)."""
    paths = {_path(m) for m in _methods()}
    assert PUBLISH_UPDATES in paths
    assert "/orchestrator.admin.v1.AdminService/GetTask" in paths
    assert "/grpc.health.v1.Health/Check" in paths
    assert len(paths) >= 21


@pytest.mark.parametrize(("method", "frame"), list(_cases()))
async def test_an_undecodable_request_is_invalid_argument_without_a_traceback(
    memory_server: RunningServer,
    caplog: pytest.LogCaptureFixture,
    method: MethodDescriptor,
    frame: bytes,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _call_raw(memory_server.channel, method, frame)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert method.input_type.full_name in (error.value.details() or "")
    assert _errors_logged(caplog) == []


async def test_an_undecodable_frame_without_a_key_is_refused_without_a_traceback(
    memory_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    call = memory_server.channel.unary_unary(
        "/orchestrator.v1.SessionService/CreateSession",
        request_serializer=_identity,
        response_deserializer=_identity,
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call(TRUNCATED, timeout=TIMEOUT_S)
    assert error.value.code() in (
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert _errors_logged(caplog) == []


async def test_a_bad_frame_in_publish_updates_is_malformed_and_the_stream_goes_on(
    flow: Flow, caplog: pytest.LogCaptureFixture
) -> None:
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    job_id = accepted.job_id
    frames = [
        notice(job_id, 1, "progress", progress=0.5).SerializeToString(),
        TRUNCATED,
        _invalid_utf8_notice(job_id),
        completed(job_id, 2, "after the bad frames").SerializeToString(),
    ]
    publish = flow.channel.stream_unary(
        PUBLISH_UPDATES,
        request_serializer=_identity,
        response_deserializer=task_update_pb2.PublishUpdatesResponse.FromString,
    )
    reply = await publish(iter(frames), metadata=service(), timeout=TIMEOUT_S)
    assert (reply.received, reply.accepted, reply.rejected_malformed) == (4, 2, 2)
    assert [(r.index, r.reason) for r in reply.rejected] == [
        (1, task_update_pb2.REJECT_REASON_MALFORMED),
        (2, task_update_pb2.REJECT_REASON_MALFORMED),
    ]
    assert all("PublishUpdatesRequest" in r.detail for r in reply.rejected)
    events = await read_to_end(call)
    assert [kind_of(e) for e in events] == ["progress", "completed"]
    assert events[-1].completed.result.text == "after the bad frames"
    assert _errors_logged(caplog) == []


def _invalid_utf8_notice(job_id: str) -> bytes:
    """A notice whose delta (field 12, a string) is not UTF-8."""
    valid = notice(job_id, 9, "delta").SerializeToString()
    return valid + bytes([12 << 3 | 2, 2]) + b"\xff\xfe"


@pytest.fixture
async def ws(flow: Flow) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    url = f"http://127.0.0.1:{flow.running.server.ws_bridge.port}/ws/task_updates"
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(url, headers=dict(service())) as socket,
    ):
        yield socket


@pytest.mark.parametrize("depth", [200, 100_000])
async def test_deeply_nested_websocket_json_gets_the_error_reply_and_the_socket_stays_open(
    flow: Flow,
    ws: aiohttp.ClientWebSocketResponse,
    caplog: pytest.LogCaptureFixture,
    depth: int,
) -> None:
    await ws.send_str("[" * depth + "]" * depth)
    reply = await ws.receive_json(timeout=5)
    assert reply["error"] == "malformed_json" and "nested" in reply["detail"]
    await ws.send_str('{"event": "job_completed", "service": "query", "result": ' + "[" * depth)
    assert (await ws.receive_json(timeout=5))["error"] == "malformed_json"
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    await ws.send_json(
        {
            "event": "job_completed",
            "service": "query",
            "job_id": accepted.job_id,
            "tenant_id": "acme",
            "result": {"text": "still open"},
        }
    )
    assert (await ws.receive_json(timeout=5))["verdict"] == "accepted"
    (done,) = await read_to_end(call)
    assert done.completed.result.text == "still open"
    assert _errors_logged(caplog) == []

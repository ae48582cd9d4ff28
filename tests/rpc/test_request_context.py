"""Request ids and trace context over a real server: returned in the trailers of unary calls
(or, with ORCH_UNARY_REQUEST_ID=initial, in their headers) and in the headers of streams, before
their first message; in the trailers of refused calls; bound for handlers and handed to the
domain in the CallContext, and on every JSON log line."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.v1 import chat_pb2, chat_pb2_grpc, session_pb2, session_pb2_grpc
from server.logging_setup import JsonFormatter, RequestContextFilter
from tests.support.probe import ECHO, Probe, echo_method
from tests.support.servers import RunningServer, running_server, tenant, test_settings

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def server(probe: Probe) -> AsyncIterator[RunningServer]:
    async with running_server(test_settings(None), extra_handlers=[probe.handler()]) as running:
        yield running


async def returned_request_id(server: RunningServer, **headers: str) -> str:
    """The request id a unary call got back (in its trailers, the default)."""
    call = session_pb2_grpc.SessionServiceStub(server.channel).ListSessions(
        session_pb2.ListSessionsRequest(), metadata=tenant("acme", **headers)
    )
    await call
    return str(dict(await call.trailing_metadata())["x-request-id"])


async def test_a_given_request_id_is_echoed(server: RunningServer) -> None:
    assert await returned_request_id(server, **{"x-request-id": "req-42.a"}) == "req-42.a"


async def test_a_request_id_is_generated_when_missing_or_invalid(server: RunningServer) -> None:
    generated = await returned_request_id(server)
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert await returned_request_id(server) != generated
    for bad in ("x" * 129, "has space", 'quote"'):
        replaced = await returned_request_id(server, **{"x-request-id": bad})
        assert re.fullmatch(r"[0-9a-f]{32}", replaced)


async def test_unary_calls_return_the_request_id_in_their_trailers_by_default(
    server: RunningServer,
) -> None:
    call = session_pb2_grpc.SessionServiceStub(server.channel).ListSessions(
        session_pb2.ListSessionsRequest(), metadata=tenant("acme", **{"x-request-id": "r-t"})
    )
    await call
    assert dict(await call.trailing_metadata())["x-request-id"] == "r-t"
    assert "x-request-id" not in dict(await call.initial_metadata())


async def test_calls_without_identity_get_a_request_id_too(server: RunningServer) -> None:
    call = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest())
    await call
    assert dict(await call.trailing_metadata())["x-request-id"]


async def test_the_initial_setting_returns_unary_request_ids_in_the_headers() -> None:
    async with running_server(test_settings(None, unary_request_id="initial")) as running:
        call = session_pb2_grpc.SessionServiceStub(running.channel).ListSessions(
            session_pb2.ListSessionsRequest(), metadata=tenant("acme", **{"x-request-id": "r-i"})
        )
        await call
        assert dict(await call.initial_metadata())["x-request-id"] == "r-i"
        assert "x-request-id" not in dict(await call.trailing_metadata())


@pytest.mark.parametrize("mode", ["initial", "trailing"])
async def test_a_refused_call_names_its_request_id_in_its_trailers(mode: str) -> None:
    async with running_server(test_settings(None, unary_request_id=mode)) as running:
        call = session_pb2_grpc.SessionServiceStub(running.channel).ListSessions(
            session_pb2.ListSessionsRequest(),
            metadata=(("authorization", "Bearer ao_nosuchkey_wrong"), ("x-request-id", "r-no")),
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        trailers: dict[str, Any] = dict(cast(Any, refused.value.trailing_metadata()) or ())
        assert trailers["x-request-id"] == "r-no"


async def test_streams_send_the_request_id_in_their_headers_before_any_message(
    server: RunningServer,
) -> None:
    created = await session_pb2_grpc.SessionServiceStub(server.channel).CreateSession(
        session_pb2.CreateSessionRequest(agent_id="agent"), metadata=tenant("acme")
    )
    stream = chat_pb2_grpc.ChatServiceStub(server.channel).StreamSession(
        chat_pb2.StreamSessionRequest(session_id=created.session.session_id),
        metadata=tenant("acme", **{"x-request-id": "r-s"}),
        timeout=10,
    )
    # No event is sent (the session is idle): the headers arrive before any message.
    assert dict(await stream.initial_metadata())["x-request-id"] == "r-s"
    stream.cancel()
    watch = health_pb2_grpc.HealthStub(server.channel).Watch(
        health_pb2.HealthCheckRequest(), metadata=(("x-request-id", "r-w"),), timeout=10
    )
    assert dict(await watch.initial_metadata())["x-request-id"] == "r-w"
    watch.cancel()


async def test_handlers_and_the_domain_see_the_same_context(
    server: RunningServer, probe: Probe
) -> None:
    echo = echo_method(server.channel)
    call = echo(
        b"hi", metadata=tenant("acme", **{"x-request-id": "r-1", "traceparent": TRACEPARENT})
    )
    assert await call == b"hi"
    seen = probe.seen[-1]
    assert seen.request_id == "r-1" and seen.traceparent == TRACEPARENT
    assert seen.caller is not None and seen.caller.tenant_id == "acme"
    assert seen.call is not None
    assert (seen.call.tenant_id, seen.call.request_id, seen.call.traceparent) == (
        "acme",
        "r-1",
        TRACEPARENT,
    )

    await echo(b"", metadata=tenant("acme", traceparent="00-not-a-trace"))
    seen = probe.seen[-1]
    assert seen.traceparent is None
    assert seen.call is not None and seen.call.request_id == seen.request_id != ""
    assert seen.call.traceparent is None


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.addFilter(RequestContextFilter())
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def json_lines() -> Iterator[list[str]]:
    handler = _Records()
    logger = logging.getLogger("tests.probe")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)


async def test_json_log_lines_carry_the_request_context(
    server: RunningServer, json_lines: list[str]
) -> None:
    echo = echo_method(server.channel)
    await echo(b"", metadata=tenant("acme", **{"x-request-id": "log-me"}))
    entry = json.loads(json_lines[-1])
    assert entry["message"] == "probe called"
    assert entry["request_id"] == "log-me"
    assert entry["tenant"] == "acme"
    assert entry["method"] == ECHO

"""Poison notices: every notice field is bounded at ingress, over gRPC and the WebSocket alike.
A notice out of bounds is answered ``malformed`` naming the field, and its job and session keep
working: later notices apply, SendMessage ends with the final event, StreamSession and GetTask
read them. An event already stored that cannot be converted does not break StreamSession."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import struct_pb2
from redis.asyncio import Redis

from domain.jobs import EventDraft, EventKind
from orchestrator.admin.v1 import admin_pb2
from orchestrator.v1 import common_pb2, task_update_pb2
from registry.keys import KeySpace
from registry.memory_jobs import MemoryEventLog
from tests.support.admin_calls import admin_stub, get_task
from tests.support.downstream import RecordingDispatcher
from tests.support.flow import Flow, completed, kind_of, notice, read_events, read_to_end
from tests.support.servers import admin, running_server, service, test_settings

INT64_MAX = 2**63 - 1
OTHER_JOB = "0190a0b0-0000-7000-8000-00000000abcd"


@pytest.fixture
async def flow(backend_url: str | None) -> AsyncIterator[Flow]:
    dispatcher = RecordingDispatcher()
    async with running_server(test_settings(backend_url), dispatcher=dispatcher) as running:
        yield Flow(running, dispatcher)


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"a": value}
    return value


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def _result(**fields: Any) -> common_pb2.JobResult:
    return common_pb2.JobResult(text=fields.pop("text", "x"), **fields)


# (field the verdict must name, the poison notice as the first notice of a job: sequence 1)
GRPC_POISON: dict[str, tuple[str, Any]] = {
    "sequence-int64-max": ("sequence", lambda j: notice(j, INT64_MAX, "progress")),
    "sequence-beyond-2^53": ("sequence", lambda j: notice(j, 2**53 + 1, "delta", delta="x")),
    # 33 levels decode in the request, but not inside a ChatEvent (protobuf's depth limit).
    "nested-result": (
        "result",
        lambda j: notice(j, 1, "completed", result=_result(data=_struct({"n": _nested(32)}))),
    ),
    "huge-result": (
        "result",
        lambda j: notice(j, 1, "completed", result=_result(text="x" * (3 * 1024 * 1024 // 2))),
    ),
    "non-finite-result": (
        "result",
        lambda j: notice(j, 1, "completed", result=_result(data=_struct({"s": float("nan")}))),
    ),
    "non-finite-embedding": (
        "result.embeddings",
        lambda j: notice(
            j,
            1,
            "completed",
            result=_result(embeddings=[common_pb2.Vector(values=[1.0, float("inf")])]),
        ),
    ),
    "long-model": (
        "result.model",
        lambda j: notice(j, 1, "completed", result=_result(model="m" * 10_000)),
    ),
    "huge-usage": (
        "usage.prompt_tokens",
        lambda j: notice(
            j, 1, "completed", result=_result(), usage=common_pb2.TokenUsage(prompt_tokens=2**62)
        ),
    ),
    "long-agent-id": ("agent_id", lambda j: notice(j, 1, "progress", agent_id="a" * 10_000)),
    "long-delta": ("delta", lambda j: notice(j, 1, "delta", delta="d" * 1_000_000)),
    "long-status-message": (
        "status_message",
        lambda j: notice(j, 1, "progress", status_message="s" * 100_000),
    ),
    "long-error-code": (
        "error.code",
        lambda j: notice(j, 1, "failed", error=common_pb2.JobError(code="c" * 10_000)),
    ),
    "long-error-message": (
        "error.message",
        lambda j: notice(j, 1, "failed", error=common_pb2.JobError(message="m" * 1_000_000)),
    ),
}


async def _assert_job_and_session_still_work(flow: Flow, call: Any, session_id: str) -> None:
    """The job ended with the good completion sent after the poison, and the session and
    the task read back fine."""
    events = await read_to_end(call)
    assert [kind_of(e) for e in events] == ["progress", "completed"]
    assert events[-1].completed.result.text == "good answer"
    follow = flow.follow(session_id)
    followed = await read_events(follow, 3)
    follow.cancel()
    assert [kind_of(e) for e in followed] == ["accepted", "progress", "completed"]
    task = await get_task(flow.channel, "acme", events[-1].job_id)
    assert task.state == admin_pb2.TASK_STATE_COMPLETED
    assert task.usage.total_tokens == 8


@pytest.mark.parametrize("case", list(GRPC_POISON))
async def test_a_poison_notice_over_grpc_is_malformed_naming_the_field(
    flow: Flow, case: str
) -> None:
    field, build = GRPC_POISON[case]
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    job_id = accepted.job_id
    reply = await flow.publish(
        [
            build(job_id),
            notice(job_id, 1, "progress", progress=0.5),
            completed(job_id, 2, "good answer"),
        ]
    )
    assert (reply.received, reply.rejected_malformed, reply.accepted) == (3, 1, 2)
    (rejected,) = reply.rejected
    assert rejected.index == 0 and rejected.reason == task_update_pb2.REJECT_REASON_MALFORMED
    assert rejected.detail.startswith(f"{field}:"), rejected.detail
    await _assert_job_and_session_still_work(flow, call, session_id)


def _completed_json(job_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "event": "job_completed",
        "service": "query",
        "job_id": job_id,
        "tenant_id": "acme",
        "result": {"text": "x"},
        **fields,
    }


def _usage_text(job_id: str, value: str) -> str:
    """A completed notice whose prompt token count is ``value`` as written (raw JSON)."""
    body = json.dumps(_completed_json(job_id, usage={"prompt_tokens": 0}))
    return body.replace('"prompt_tokens": 0', f'"prompt_tokens": {value}')


# (field the verdict must name, the poison message as JSON text)
WS_POISON: dict[str, tuple[str, Any]] = {
    "sequence-beyond-int64": (
        "sequence",
        lambda j: json.dumps(_completed_json(j, sequence=2**64 + 5)),
    ),
    "sequence-int64-max": (
        "sequence",
        lambda j: json.dumps(_completed_json(j, sequence=INT64_MAX)),
    ),
    "nested-result": (
        "result",
        lambda j: json.dumps(_completed_json(j, result={"text": "x", "n": _nested(100)})),
    ),
    "huge-result": (
        "result",
        lambda j: json.dumps(_completed_json(j, result={"text": "x" * (3 * 1024 * 1024 // 2)})),
    ),
    "infinite-usage": ("usage.prompt_tokens", lambda j: _usage_text(j, "1e400")),
    "huge-usage": ("usage.prompt_tokens", lambda j: _usage_text(j, str(2**70))),
    "usage-not-a-number": ("usage.prompt_tokens", lambda j: _usage_text(j, '"lots"')),
    "bad-embeddings": (
        "result.embeddings",
        lambda j: json.dumps(_completed_json(j, result={"embeddings": [["x"]]})),
    ),
    "long-agent-id": (
        "agent_id",
        lambda j: json.dumps(_completed_json(j, agent_id="a" * 10_000)),
    ),
    "long-delta": (
        "delta",
        lambda j: json.dumps(
            {**_completed_json(j), "event": "job_delta", "delta": "d" * 1_000_000}
        ),
    ),
    "long-error-message": (
        "error.message",
        lambda j: json.dumps({**_completed_json(j), "event": "job_failed", "error": "e" * 10**6}),
    ),
}


@pytest.fixture
async def ws(flow: Flow) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    url = f"http://127.0.0.1:{flow.running.server.ws_bridge.port}/ws/task_updates"
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(url, headers=dict(service())) as socket,
    ):
        yield socket


@pytest.mark.parametrize("case", list(WS_POISON))
async def test_a_poison_notice_over_the_websocket_is_malformed_naming_the_field(
    flow: Flow, ws: aiohttp.ClientWebSocketResponse, case: str
) -> None:
    field, build = WS_POISON[case]
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    job_id = accepted.job_id
    await ws.send_str(build(job_id))
    verdict = await ws.receive_json(timeout=5)
    assert verdict["verdict"] == "malformed" and verdict["job_id"] == job_id
    assert verdict["detail"].startswith(f"{field}:"), verdict["detail"]
    await ws.send_json({**_completed_json(job_id), "event": "job_progress", "progress": 0.5})
    assert (await ws.receive_json(timeout=5))["verdict"] == "accepted"
    good = _completed_json(
        job_id,
        result={"text": "good answer"},
        usage={"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
    )
    await ws.send_json(good)
    assert (await ws.receive_json(timeout=5))["verdict"] == "accepted"
    await _assert_job_and_session_still_work(flow, call, session_id)


# -- events already stored -----------------------------------------------------------------


async def _store_raw_redis(
    flow: Flow, session_id: str, job_id: str, kind: str, data_json: str
) -> int:
    """Append an event envelope to the session's log as the job scripts would, bypassing
    every check (as an older release, or a poison notice accepted before the bounds, did)."""
    keys = KeySpace(flow.running.server.settings.redis_key_prefix)
    url = flow.running.server.settings.redis_url
    assert url is not None
    envelope = f'{{"j":"{job_id}","r":"req-1","k":"{kind}","d":{data_json}}}'
    redis = Redis.from_url(url, decode_responses=True)
    try:
        seq = int(await redis.incr(keys.session_event_seq("acme", session_id)))
        await redis.xadd(
            keys.session_events("acme", session_id), {"t": "1", "e": envelope}, id=f"{seq}-0"
        )
        await redis.spublish(keys.session_channel("acme", session_id), f"{seq} 1 {envelope}")
    finally:
        await redis.aclose()
    return seq


async def _store_deep_completion(flow: Flow, session_id: str) -> int:
    """A completed event of another job whose result is nested 300 levels deep."""
    data = {"result": {"text": "deep", "data": {"n": _nested(300)}}, "usage": {}}
    events = flow.running.server.backend.events
    if isinstance(events, MemoryEventLog):
        draft = EventDraft(OTHER_JOB, EventKind.COMPLETED, "req-1", data)
        return events.append("acme", session_id, draft).sequence
    return await _store_raw_redis(flow, session_id, OTHER_JOB, "completed", json.dumps(data))


async def test_a_stored_event_that_cannot_be_converted_does_not_break_the_stream(
    flow: Flow, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    job_id = accepted.job_id
    live = flow.follow(session_id)
    assert kind_of((await read_events(live, 1))[0]) == "accepted"
    bad_sequence = await _store_deep_completion(flow, session_id)
    await flow.publish([notice(job_id, 1, "progress"), completed(job_id, 2, "good answer")])

    # A final event that cannot be converted reaches clients as a failed event of its job.
    expected = ["accepted", "failed", "progress", "completed"]
    later = await read_events(live, 3)
    live.cancel()
    assert [kind_of(e) for e in later] == expected[1:]
    replay = flow.follow(session_id)
    events = await read_events(replay, 4)
    replay.cancel()
    assert [kind_of(e) for e in events] == expected
    unreadable = events[1]
    assert (unreadable.job_id, unreadable.sequence) == (OTHER_JOB, bad_sequence)
    assert unreadable.failed.error.code == "unreadable_event"
    assert [kind_of(e) for e in await read_to_end(call)] == ["progress", "completed"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(session_id in m and f"event {bad_sequence}" in m for m in warnings), warnings
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("kind", "data_json"),
    [
        ("completed", "{not json"),
        ("a-kind-from-the-future", "{}"),
        ("progress", '{"fraction": "half"}'),
        ("accepted", "[]"),
    ],
)
async def test_a_stored_event_that_cannot_be_read_is_skipped_on_redis(
    redis_url: str, caplog: pytest.LogCaptureFixture, kind: str, data_json: str
) -> None:
    caplog.set_level(logging.WARNING)
    dispatcher = RecordingDispatcher()
    async with running_server(test_settings(redis_url), dispatcher=dispatcher) as running:
        flow = Flow(running, dispatcher)
        session_id = await flow.new_session()
        call, accepted = await flow.start_job(session_id)
        job_id = accepted.job_id
        live = flow.follow(session_id)
        assert kind_of((await read_events(live, 1))[0]) == "accepted"
        bad_sequence = await _store_raw_redis(flow, session_id, OTHER_JOB, kind, data_json)
        await flow.publish([notice(job_id, 1, "progress"), completed(job_id, 2, "good answer")])
        later = await read_events(live, 2)
        live.cancel()
        assert [kind_of(e) for e in later] == ["progress", "completed"]
        replay = flow.follow(session_id)
        events = await read_events(replay, 3)
        replay.cancel()
        assert [kind_of(e) for e in events] == ["accepted", "progress", "completed"]
        assert [e.sequence for e in events] == [1, bad_sequence + 1, bad_sequence + 2]
        assert [kind_of(e) for e in await read_to_end(call)] == ["progress", "completed"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(session_id in m and f"event {bad_sequence}" in m for m in warnings), warnings
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_get_task_of_a_stored_job_that_does_not_parse_is_data_loss(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = RecordingDispatcher()
    async with running_server(test_settings(redis_url), dispatcher=dispatcher) as running:
        flow = Flow(running, dispatcher)
        session_id = await flow.new_session()
        _, accepted = await flow.start_job(session_id)
        keys = KeySpace(running.server.settings.redis_key_prefix)
        redis = Redis.from_url(redis_url, decode_responses=True)
        try:
            # What a sequence beyond 2**53 left behind before the bounds (Lua numbers).
            await redis.hset(keys.job("acme", accepted.job_id), "nseq", "9.2233720368547758e+18")
        finally:
            await redis.aclose()
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await admin_stub(flow.channel).GetTask(
                admin_pb2.GetTaskRequest(tenant_id="acme", job_id=accepted.job_id),
                metadata=admin(),
            )
    assert error.value.code() == grpc.StatusCode.DATA_LOSS
    assert accepted.job_id in (error.value.details() or "")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]

"""Deadlines, heartbeats and cancellation."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from orchestrator.v1 import chat_pb2, session_pb2
from tests.support.flow import Flow, kind_of, notice, read_events, read_to_end
from tests.support.servers import tenant


@pytest.fixture
def flow_settings() -> dict[str, Any]:
    return {"job_heartbeat": 0.4, "job_deadline": 30.0, "reaper_interval": 0.05}


async def test_a_silent_job_times_out_and_the_client_is_told(flow: Flow) -> None:
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    events = await read_to_end(call)
    assert [kind_of(e) for e in events] == ["timed_out"]
    assert events[0].timed_out.deadline.ToMilliseconds() >= accepted.time.ToMilliseconds()
    session = await flow.get_session(session_id)
    assert session.state == session_pb2.SESSION_STATE_ACTIVE
    late = await flow.publish([notice(accepted.job_id, 1, "delta", delta="late")])
    assert late.rejected_job_finished == 1


async def test_progress_notices_keep_a_job_alive(flow: Flow) -> None:
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    # Six notices 0.15 s apart span more than twice the 0.4 s heartbeat: the job lives on
    # because each one extends it (the passing time is what is tested here).
    for n in range(1, 7):
        await asyncio.sleep(0.15)
        await flow.publish([notice(accepted.job_id, n, "progress", progress=n / 10)])
        (event,) = await read_events(call, 1)
        assert kind_of(event) == "progress"
    events = await read_to_end(call)
    assert [kind_of(e) for e in events] == ["timed_out"]


async def test_cancel_tells_the_service_and_the_client(flow: Flow) -> None:
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    reply = await flow.chat.CancelJob(
        chat_pb2.CancelJobRequest(session_id=session_id, job_id=accepted.job_id),
        metadata=tenant("acme"),
    )
    assert kind_of(reply.event) == "cancelled"
    (event,) = await read_to_end(call)
    assert kind_of(event) == "cancelled" and event.sequence == reply.event.sequence
    assert flow.dispatcher.cancelled[-1][1] == accepted.job_id
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await flow.chat.CancelJob(
            chat_pb2.CancelJobRequest(session_id=session_id, job_id=accepted.job_id),
            metadata=tenant("acme"),
        )
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_cancelling_another_tenants_job_is_not_found(flow: Flow) -> None:
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await flow.chat.CancelJob(
            chat_pb2.CancelJobRequest(session_id=session_id, job_id=accepted.job_id),
            metadata=tenant("globex"),
        )
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    call.cancel()


async def test_cancel_with_a_malformed_job_id_names_the_field(flow: Flow) -> None:
    session_id = await flow.new_session()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await flow.chat.CancelJob(
            chat_pb2.CancelJobRequest(session_id=session_id, job_id="nope"),
            metadata=tenant("acme"),
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "job_id" in (error.value.details() or "")

"""SendMessage: a message becomes a job, its notices become the caller's events."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from domain.dispatch import DownstreamError
from domain.models import WorkKind
from orchestrator.v1 import chat_pb2, common_pb2, session_pb2
from tests.support.flow import Flow, completed, kind_of, notice, read_events, read_to_end
from tests.support.servers import tenant


async def test_a_message_streams_accepted_progress_deltas_and_completed(flow: Flow) -> None:
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    job_id = accepted.job_id
    assert accepted.accepted.content == "hello"
    assert accepted.accepted.service == common_pb2.SERVICE_QUERY

    reply = await flow.publish(
        [
            notice(job_id, 1, "progress", progress=0.5, status_message="halfway"),
            notice(job_id, 2, "delta", delta="Hel"),
            notice(job_id, 3, "delta", delta="lo"),
            completed(job_id, 4, "Hello"),
        ]
    )
    assert (reply.received, reply.accepted) == (4, 4)

    events = await read_to_end(call)
    assert [kind_of(e) for e in events] == ["progress", "delta", "delta", "completed"]
    assert events[0].progress.fraction == 0.5
    assert "".join(e.delta.text for e in events[1:3]) == "Hello"
    assert events[-1].completed.result.text == "Hello"
    assert events[-1].completed.usage.total_tokens == 8
    sequences = [accepted.sequence] + [e.sequence for e in events]
    assert sequences == list(range(sequences[0], sequences[0] + 5))
    assert all(e.job_id == job_id and e.session_id == session_id for e in events)


async def test_a_completed_job_updates_the_session(flow: Flow) -> None:
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    busy = await flow.get_session(session_id)
    assert busy.state == session_pb2.SESSION_STATE_BUSY
    assert list(busy.pending_job_ids) == [accepted.job_id]

    await flow.publish([completed(accepted.job_id, 1, "done")])
    await read_to_end(call)

    idle = await flow.get_session(session_id)
    assert idle.state == session_pb2.SESSION_STATE_ACTIVE
    assert list(idle.pending_job_ids) == []
    assert idle.message_count == 2  # the user's message and the reply
    assert idle.token_usage.total_tokens == 8


async def test_the_work_goes_to_the_service_of_its_kind_with_the_job_id(flow: Flow) -> None:
    session_id = await flow.new_session()
    call = flow.send(session_id, "embed me", kind=common_pb2.WORK_KIND_EMBEDDING)
    first = await call.read()
    work = await flow.dispatcher.next_submit()
    assert work.job_id == first.event.job_id
    assert work.kind is WorkKind.EMBEDDING
    assert first.event.accepted.service == common_pb2.SERVICE_EMBEDDING
    call.cancel()


async def test_a_failed_notice_ends_the_stream_with_the_error(flow: Flow) -> None:
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    await flow.publish(
        [
            notice(
                accepted.job_id,
                1,
                "failed",
                error=common_pb2.JobError(code="model_error", message="boom"),
            )
        ]
    )
    events = await read_to_end(call)
    assert [kind_of(e) for e in events] == ["failed"]
    assert events[0].failed.error.code == "model_error"


async def test_a_downstream_that_is_down_gives_a_failed_event_not_a_hang(flow: Flow) -> None:
    flow.dispatcher.fail_with = DownstreamError(
        "downstream_unavailable", "query service unreachable", retryable=True
    )
    session_id = await flow.new_session()
    events = await read_to_end(flow.send(session_id))
    assert [kind_of(e) for e in events] == ["accepted", "failed"]
    assert events[1].failed.error.code == "downstream_unavailable"
    assert events[1].failed.error.retryable
    session = await flow.get_session(session_id)
    assert session.state == session_pb2.SESSION_STATE_ACTIVE


async def test_unknown_session_is_not_found(flow: Flow) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await read_to_end(flow.send("0190a0b0-0000-7000-8000-000000000000"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert error.value.details() == "session 0190a0b0-0000-7000-8000-000000000000 not found"


async def test_another_tenants_session_is_not_found(flow: Flow) -> None:
    session_id = await flow.new_session("acme")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await read_to_end(flow.send(session_id, tenant_id="globex"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert flow.dispatcher.submitted == []


async def test_a_closed_session_refuses_messages(flow: Flow) -> None:
    session_id = await flow.new_session()
    await flow.sessions.CloseSession(
        session_pb2.CloseSessionRequest(session_id=session_id),
        metadata=tenant("acme"),
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await read_to_end(flow.send(session_id))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.value.details() == f"session {session_id} is closed"


async def test_empty_content_names_the_field(flow: Flow) -> None:
    session_id = await flow.new_session()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await read_to_end(flow.send(session_id, content="  "))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "content" in (error.value.details() or "")


async def test_busy_policy_reject_refuses_a_second_job(flow: Flow) -> None:
    session_id = await flow.new_session()
    call, _ = await flow.start_job(session_id)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await read_to_end(flow.send(session_id, busy_policy=chat_pb2.BUSY_POLICY_REJECT))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    call.cancel()


async def test_request_id_is_echoed_on_the_jobs_events(flow: Flow) -> None:
    session_id = await flow.new_session()
    call: Any = flow.chat.SendMessage(
        chat_pb2.SendMessageRequest(session_id=session_id, content="hi"),
        metadata=(*tenant("acme"), ("x-request-id", "req-42")),
    )
    first = await call.read()
    assert first.event.request_id == "req-42"
    work = await flow.dispatcher.next_submit()
    await flow.publish([completed(work.job_id, 1, "x")])
    (done,) = await read_events(call, 1)
    assert done.request_id == "req-42"
    assert flow.dispatcher.submitted[0][1].request_id == "req-42"

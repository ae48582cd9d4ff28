"""Queued messages: a session runs its messages in order. A message sent while a job is in
flight waits behind it (BUSY_POLICY_QUEUE, the default) and background messages always go
through the work queue; either way the sender's stream and the session's stream see the job's
events as for any job."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from orchestrator.v1 import chat_pb2, common_pb2, session_pb2
from tests.support.flow import Flow, completed, kind_of, read_events, read_to_end
from tests.support.servers import tenant


async def send_queued(flow: Flow, session_id: str, content: str = "next", **fields: Any) -> Any:
    """Send a message that must be queued; returns the open call after its accepted event."""
    call = flow.send(session_id, content, **fields)
    first = await call.read()
    assert kind_of(first.event) == "accepted"
    assert first.event.accepted.queued
    return call, first.event


async def test_a_message_to_a_busy_session_waits_until_the_job_in_flight_ends(
    flow: Flow,
) -> None:
    session_id = await flow.new_session()
    first_call, first = await flow.start_job(session_id)
    second_call, second = await send_queued(flow, session_id)
    assert [work.job_id for work, _ in flow.dispatcher.submitted] == [first.job_id]
    await flow.publish([completed(first.job_id, 1, "one")])
    work = await flow.dispatcher.next_submit()
    assert work.job_id == second.job_id
    assert work.content == "next"
    await flow.publish([completed(second.job_id, 1, "two")])
    assert [e.completed.result.text for e in await read_to_end(first_call)] == ["one"]
    assert [e.completed.result.text for e in await read_to_end(second_call)] == ["two"]


async def test_queued_messages_go_to_their_service_in_the_order_they_were_sent(
    flow: Flow,
) -> None:
    session_id = await flow.new_session()
    _, first = await flow.start_job(session_id)
    _, second = await send_queued(flow, session_id, "second")
    _, third = await send_queued(flow, session_id, "third")
    await flow.publish([completed(first.job_id, 1, "one")])
    assert (await flow.dispatcher.next_submit()).job_id == second.job_id
    await flow.publish([completed(second.job_id, 1, "two")])
    assert (await flow.dispatcher.next_submit()).job_id == third.job_id


async def test_a_queued_message_starts_after_the_job_ahead_fails(flow: Flow) -> None:
    session_id = await flow.new_session()
    _, first = await flow.start_job(session_id)
    _, second = await send_queued(flow, session_id)
    await flow.chat.CancelJob(
        chat_pb2.CancelJobRequest(session_id=session_id, job_id=first.job_id),
        metadata=tenant("acme"),
    )
    assert (await flow.dispatcher.next_submit()).job_id == second.job_id


async def test_a_background_message_runs_through_the_queue_and_reaches_the_session_stream(
    flow: Flow,
) -> None:
    session_id = await flow.new_session()
    follower = flow.follow(session_id)
    call, accepted = await send_queued(
        flow, session_id, "long work", background=True, priority=common_pb2.PRIORITY_HIGH
    )
    work = await flow.dispatcher.next_submit()
    assert work.job_id == accepted.job_id
    await flow.publish([completed(accepted.job_id, 1, "done")])
    (done,) = await read_to_end(call)
    assert done.completed.result.text == "done"
    seen = await read_events(follower, 2)
    assert [kind_of(e) for e in seen] == ["accepted", "completed"]
    assert all(e.job_id == accepted.job_id for e in seen)
    follower.cancel()


async def test_a_background_job_keeps_running_after_its_sender_leaves(flow: Flow) -> None:
    session_id = await flow.new_session()
    follower = flow.follow(session_id)
    call, accepted = await send_queued(flow, session_id, background=True)
    call.cancel()
    assert (await flow.dispatcher.next_submit()).job_id == accepted.job_id
    await flow.publish([completed(accepted.job_id, 1, "kept")])
    seen = await read_events(follower, 2)
    assert [kind_of(e) for e in seen] == ["accepted", "completed"]
    assert seen[1].completed.result.text == "kept"
    follower.cancel()


async def test_a_queued_job_has_a_stored_result_in_the_work_queue(flow: Flow) -> None:
    session_id = await flow.new_session()
    call, accepted = await send_queued(flow, session_id, background=True)
    await flow.dispatcher.next_submit()
    await flow.publish([completed(accepted.job_id, 1, "stored")])
    await read_to_end(call)
    queue = flow.running.server.services.chat_queue
    result = await queue.wait_result(accepted.job_id, 5.0)
    assert result is not None and result.value is not None
    assert b'"kind":"completed"' in result.value


async def test_cancelling_a_queued_message_never_reaches_its_service(flow: Flow) -> None:
    session_id = await flow.new_session()
    _, first = await flow.start_job(session_id)
    second_call, second = await send_queued(flow, session_id)
    reply = await flow.chat.CancelJob(
        chat_pb2.CancelJobRequest(session_id=session_id, job_id=second.job_id),
        metadata=tenant("acme"),
    )
    assert kind_of(reply.event) == "cancelled"
    assert [kind_of(e) for e in await read_to_end(second_call)] == ["cancelled"]
    assert flow.dispatcher.cancelled == []
    await flow.publish([completed(first.job_id, 1, "one")])
    _, third = await flow.start_job(session_id)  # the session is idle again: no wait
    assert [w.job_id for w, _ in flow.dispatcher.submitted] == [first.job_id, third.job_id]


async def test_reject_refuses_while_a_queued_message_waits(flow: Flow) -> None:
    session_id = await flow.new_session()
    await send_queued(flow, session_id, background=True)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await read_to_end(flow.send(session_id, busy_policy=chat_pb2.BUSY_POLICY_REJECT))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_an_unknown_priority_names_the_field(flow: Flow) -> None:
    session_id = await flow.new_session()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await read_to_end(flow.send(session_id, background=True, priority=42))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "priority" in (error.value.details() or "")


async def test_closing_the_session_cancels_its_queued_messages(flow: Flow) -> None:
    session_id = await flow.new_session()
    await flow.start_job(session_id)
    _, queued = await send_queued(flow, session_id)
    await flow.sessions.CloseSession(
        session_pb2.CloseSessionRequest(session_id=session_id), metadata=tenant("acme")
    )
    queue = flow.running.server.services.chat_queue
    result = await queue.wait_result(queued.job_id, 5.0)
    assert result is not None and result.value is not None
    assert b'"kind":"cancelled"' in result.value

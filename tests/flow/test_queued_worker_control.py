"""Queued messages with the chat worker under the test's control: taken by priority, and
failed (not left waiting) when the queue gives up on them."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.v1 import common_pb2
from tests.support.flow import Flow, completed, kind_of, read_to_end


@pytest.fixture
def flow_settings() -> dict[str, Any]:
    return {"chat_worker_enabled": False}  # started by the test, with one slot


async def test_a_high_priority_background_message_is_served_before_a_low_one(
    flow: Flow,
) -> None:
    low_session, high_session = await flow.new_session(), await flow.new_session()
    accepted = {}
    for session_id, priority in (
        (low_session, common_pb2.PRIORITY_LOW),
        (high_session, common_pb2.PRIORITY_HIGH),
    ):
        call = flow.send(session_id, background=True, priority=priority)
        first = await call.read()
        assert kind_of(first.event) == "accepted" and first.event.accepted.queued
        accepted[priority] = first.event.job_id
    flow.running.server.workers.start_chat_worker(concurrency=1)
    assert (await flow.dispatcher.next_submit()).job_id == accepted[common_pb2.PRIORITY_HIGH]
    await flow.publish([completed(accepted[common_pb2.PRIORITY_HIGH], 1, "high")])
    assert (await flow.dispatcher.next_submit()).job_id == accepted[common_pb2.PRIORITY_LOW]


async def test_a_queued_message_the_queue_gives_up_on_fails_with_dead_lettered(
    flow: Flow,
) -> None:
    session_id = await flow.new_session()
    call = flow.send(session_id, background=True)
    first = await call.read()
    assert first.event.accepted.queued
    server = flow.running.server
    (item,) = await server.services.chat_queue.dequeue("test", count=1, lease_ms=60_000)
    await server.services.chat_runner.dead_lettered(item, "RuntimeError: boom")
    (failed,) = await read_to_end(call)
    assert kind_of(failed) == "failed"
    assert failed.failed.error.code == "dead_lettered"
    assert "boom" in failed.failed.error.message

"""Queued messages are taken from the work queue by priority: with one worker slot, a
high-priority message sent last is handed to its service first."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.v1 import common_pb2
from tests.support.flow import Flow, completed, kind_of


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
    flow.running.server.batch.start_chat_worker(concurrency=1)
    assert (await flow.dispatcher.next_submit()).job_id == accepted[common_pb2.PRIORITY_HIGH]
    await flow.publish([completed(accepted[common_pb2.PRIORITY_HIGH], 1, "high")])
    assert (await flow.dispatcher.next_submit()).job_id == accepted[common_pb2.PRIORITY_LOW]

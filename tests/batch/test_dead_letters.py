"""A batch item the work queue gives up on (dead letter) fails with a retryable error, so the
batch still finishes instead of waiting for its expiry."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.v1 import batch_pb2
from tests.support.batches import get_batch, llm_item, read_results, stream, submit
from tests.support.flow import Flow


@pytest.fixture
def flow_settings() -> dict[str, Any]:
    return {"batch_worker_enabled": False}  # the test takes the item itself


async def test_a_dead_lettered_item_fails_and_the_batch_completes(flow: Flow) -> None:
    batch = await submit(flow, [llm_item("only")])
    server = flow.running.server
    (item,) = await server.services.batch_queue.dequeue("test", count=1, lease_ms=60_000)
    await server.services.batch_runner.dead_lettered(item, "Unavailable: redis down")
    (result,) = await read_results(stream(flow, batch.batch_id))
    assert result.custom_id == "only"
    assert result.error.code == "dead_lettered"
    assert result.error.retryable
    final = await get_batch(flow, batch.batch_id)
    assert final.state == batch_pb2.BATCH_STATE_COMPLETED
    assert (final.counts.total, final.counts.failed) == (1, 1)

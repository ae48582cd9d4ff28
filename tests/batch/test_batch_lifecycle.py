"""Cancellation, expiry, priority and limits: two items run at a time, so the rest wait."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from orchestrator.v1 import batch_pb2, common_pb2
from tests.support.batches import (
    NoticeDriver,
    batches,
    get_batch,
    llm_item,
    read_results,
    stream,
    submit,
)
from tests.support.flow import Flow
from tests.support.servers import tenant

S = batch_pb2


def hold(_: Any) -> str:
    return "hold"


@pytest.fixture
def flow_settings() -> dict[str, Any]:
    return {
        "batch_worker_enabled": True,
        "batch_worker_concurrency": 2,
        "batch_expiry_interval": 0.05,
        "batch_max_items": 50,
    }


async def test_cancel_cancels_queued_items_and_running_jobs(flow: Flow) -> None:
    driver = NoticeDriver(flow, verdict=hold)
    async with driver.running():
        batch = await submit(flow, [llm_item(f"c{n}") for n in range(6)])
        await driver.wait_held(2)
        reply = await batches(flow).CancelBatch(
            S.CancelBatchRequest(batch_id=batch.batch_id), metadata=tenant("acme")
        )
        assert reply.batch.state in (S.BATCH_STATE_CANCELLING, S.BATCH_STATE_CANCELLED)
        assert reply.batch.counts.cancelled >= 4
        results = await read_results(stream(flow, batch.batch_id))
    assert len(results) == 6
    assert {r.state for r in results} == {S.BATCH_ITEM_STATE_CANCELLED}
    held_jobs = {w.job_id for w in driver.held}
    assert held_jobs <= {job_id for _, job_id in flow.dispatcher.cancelled}
    assert held_jobs == {r.job_id for r in results if r.job_id}
    final = await get_batch(flow, batch.batch_id)
    assert final.state == S.BATCH_STATE_CANCELLED
    assert (final.counts.cancelled, final.counts.running, final.counts.queued) == (6, 0, 0)
    # Cancelling a final batch returns it as it is.
    again = await batches(flow).CancelBatch(
        S.CancelBatchRequest(batch_id=batch.batch_id), metadata=tenant("acme")
    )
    assert again.batch.state == S.BATCH_STATE_CANCELLED


async def test_unfinished_items_expire_after_the_completion_window(flow: Flow) -> None:
    driver = NoticeDriver(flow, verdict=hold)
    async with driver.running():
        batch = await submit(
            flow, [llm_item(f"x{n}") for n in range(5)], completion_window={"seconds": 1}
        )
        await driver.wait_held(2)
        results = await read_results(stream(flow, batch.batch_id))
    assert len(results) == 5
    assert {r.state for r in results} == {S.BATCH_ITEM_STATE_EXPIRED}
    assert {r.error.code for r in results} == {"expired"}
    final = await get_batch(flow, batch.batch_id)
    assert final.state == S.BATCH_STATE_EXPIRED and final.counts.expired == 5
    # The jobs that were running are cancelled downstream.
    held_jobs = {w.job_id for w in driver.held}
    assert held_jobs <= {job_id for _, job_id in flow.dispatcher.cancelled}


async def test_the_item_limit_is_enforced(flow: Flow) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await submit(flow, [llm_item(f"i{n}") for n in range(51)])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items" in (error.value.details() or "")


@pytest.mark.parametrize("flow_settings", [{"batch_worker_enabled": False}])
async def test_higher_priority_batches_run_first(flow: Flow) -> None:
    low = await submit(
        flow, [llm_item(f"l{n}", f"low {n}") for n in range(5)], priority=common_pb2.PRIORITY_LOW
    )
    high = await submit(
        flow,
        [llm_item(f"h{n}", f"high {n}") for n in range(5)],
        priority=common_pb2.PRIORITY_HIGH,
    )
    async with NoticeDriver(flow).running():
        flow.running.server.workers.start_batch_worker(concurrency=1)
        await read_results(stream(flow, low.batch_id))
        await read_results(stream(flow, high.batch_id))
    order = [w.content.split()[0] for w, _ in flow.dispatcher.submitted]
    assert order == ["high"] * 5 + ["low"] * 5
    assert (await get_batch(flow, high.batch_id)).priority == common_pb2.PRIORITY_HIGH

"""The limits toward the services over a real server, both backends: SendMessage over a
tenant's in-flight cap is refused RESOURCE_EXHAUSTED (RetryInfo, QuotaFailure) with nothing
recorded; queued messages and batch items over it wait in their work queue, never failed or
dead-lettered, and run once the tenant is under it again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from domain.worker import QueueWorker
from orchestrator.v1 import batch_pb2 as B
from tests.support.admin_calls import quota_subjects, retry_delay_ms
from tests.support.batches import NoticeDriver, get_batch, llm_item, read_results, stream, submit
from tests.support.flow import Flow, completed, kind_of, read_to_end

CAPPED = "capped"


@pytest.fixture
def flow_settings() -> dict[str, Any]:
    return {
        "service_in_flight_overrides": f"{CAPPED}=2",
        "limit_retry_after": 0.05,
        "batch_worker_enabled": True,
        "batch_worker_concurrency": 8,
    }


async def until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait until ``predicate`` holds: a worker's counters change inside its own tasks, with
    no event to await, so they are read every 10 ms."""

    async def wait() -> None:
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    await asyncio.wait_for(wait(), timeout_s)


def worker(flow: Flow, name: str) -> QueueWorker:
    workers = flow.running.server.workers
    return workers.start_chat_worker() if name == "chat" else workers.start_batch_worker()


async def two_in_flight(flow: Flow) -> list[str]:
    """Two jobs of the capped tenant in flight at Query (its cap); their job ids."""
    jobs = []
    for _ in range(2):
        session_id = await flow.new_session(CAPPED)
        _, accepted = await flow.start_job(session_id, tenant_id=CAPPED)
        jobs.append(str(accepted.job_id))
    return jobs


async def test_send_message_over_the_in_flight_cap_is_refused_with_retry_info_and_quota(
    flow: Flow,
) -> None:
    await two_in_flight(flow)
    session_id = await flow.new_session(CAPPED)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await read_to_end(flow.send(session_id, tenant_id=CAPPED))

    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert quota_subjects(refused.value) == [f"in_flight:{CAPPED}:query"]
    assert retry_delay_ms(refused.value) == 50
    assert len(flow.dispatcher.submitted) == 2  # nothing dispatched for it
    session = await flow.get_session(session_id, CAPPED)
    assert session.message_count == 0


async def test_a_place_freed_by_a_finished_job_lets_the_next_message_start(flow: Flow) -> None:
    first, _ = await two_in_flight(flow)
    await flow.publish([completed(first, 1, "done", tenant_id=CAPPED)])
    session_id = await flow.new_session(CAPPED)

    _, accepted = await flow.start_job(session_id, tenant_id=CAPPED)

    assert kind_of(accepted) == "accepted"


async def test_another_tenant_is_not_held_back_by_a_capped_one(flow: Flow) -> None:
    await two_in_flight(flow)
    session_id = await flow.new_session("acme")

    _, accepted = await flow.start_job(session_id)

    assert kind_of(accepted) == "accepted"


async def test_a_background_message_over_the_cap_waits_in_the_queue_then_runs(
    flow: Flow,
) -> None:
    first, _ = await two_in_flight(flow)
    session_id = await flow.new_session(CAPPED)
    call = flow.send(session_id, "later", tenant_id=CAPPED, background=True)
    accepted = (await call.read()).event
    assert accepted.accepted.queued
    chat = worker(flow, "chat")
    await until(lambda: chat.stats.deferred >= 2)  # given back, and given back again
    assert len(flow.dispatcher.submitted) == 2

    await flow.publish([completed(first, 1, "done", tenant_id=CAPPED)])

    work = await flow.dispatcher.next_submit()
    assert (work.job_id, work.content) == (accepted.job_id, "later")
    await flow.publish([completed(accepted.job_id, 1, "ran", tenant_id=CAPPED)])
    (done,) = await read_to_end(call)
    assert done.completed.result.text == "ran"
    assert (chat.stats.retried, chat.stats.dead_lettered) == (0, 0)


async def test_batch_items_over_the_cap_wait_and_all_complete(flow: Flow) -> None:
    driver = NoticeDriver(flow, verdict=lambda work: "hold")
    batch_worker = worker(flow, "batch")
    async with driver.running():
        batch = await submit(flow, [llm_item(f"i{n}") for n in range(5)], tenant_id=CAPPED)
        await driver.wait_held(2)
        await until(lambda: batch_worker.stats.deferred >= 1)
        assert len(driver.held) == 2  # the cap: the others wait in the queue
        answered = 0
        while answered < 5:
            await driver.wait_held(answered + 1)
            work = driver.held[answered]
            await flow.publish([completed(work.job_id, 1, "ok", tenant_id=CAPPED)])
            answered += 1
        results = await read_results(stream(flow, batch.batch_id, tenant_id=CAPPED))
    assert sorted(r.custom_id for r in results) == [f"i{n}" for n in range(5)]
    assert {r.state for r in results} == {B.BATCH_ITEM_STATE_COMPLETED}
    final = await get_batch(flow, batch.batch_id, CAPPED)
    assert (final.counts.completed, final.counts.failed) == (5, 0)
    assert (batch_worker.stats.retried, batch_worker.stats.dead_lettered) == (0, 0)

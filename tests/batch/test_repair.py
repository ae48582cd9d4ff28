"""A batch item that a Redis Cluster failover left RUNNING (the promoted replica lacks its
result) while the work queue, on another master, has it finished: the repair pass the server
runs after a failover gives it the final event its job keeps, or fails it lost_in_failover when
the job is gone too; an item the queue still holds is left to its delivery (domain.batch_repair).
Both backends; each test leaves the stores as such a failover does, by hand."""

from __future__ import annotations

from typing import Any

import pytest

from domain.batch_runner import DONE, item_job_id
from domain.jobs import EventDraft, EventKind, IfBusy, NewJob, StartedJob
from domain.models import Service, WorkKind
from domain.ports.queue import WorkItem
from orchestrator.v1 import batch_pb2
from server.app import OrchestratorServer
from tests.support.batches import get_batch, llm_item, read_results, stream, submit
from tests.support.flow import Flow

LEASE_MS = 30_000
KEPT_ERROR = {"code": "model_error", "message": "the model refused", "retryable": False}


@pytest.fixture
def flow_settings() -> dict[str, Any]:
    return {"batch_worker_enabled": False}  # the tests play the delivery


async def delivered_and_started(server: OrchestratorServer, batch: batch_pb2.Batch) -> WorkItem:
    """Item 0 taken from the queue and RUNNING in the batch, as a delivery leaves it."""
    (item,) = await server.services.batch_queue.dequeue("w", count=1, lease_ms=LEASE_MS)
    assert await server.backend.batches.start_item("acme", batch.batch_id, 0, redelivery=False)
    return item


async def job_ended_failed(server: OrchestratorServer, batch: batch_pb2.Batch) -> str:
    """Item 0's job, started to keep its final event (as the runner starts it), ended."""
    stored = await server.backend.batches.get_batch("acme", batch.batch_id)
    assert stored is not None
    job_id = item_job_id(batch.batch_id, 0)
    new = NewJob(
        job_id,
        stored.session_id,
        "batch",
        Service.QUERY,
        WorkKind.LLM_QUERY,
        "what is rag",
        batch.batch_id,
        keep_final=True,
    )
    jobs, limits = server.backend.jobs, server.services.limits
    assert isinstance(await jobs.start_job("acme", new, limits, if_busy=IfBusy.RUN), StartedJob)
    draft = EventDraft(job_id, EventKind.FAILED, batch.batch_id, {"error": KEPT_ERROR})
    await jobs.finish_job("acme", job_id, draft, limits)
    return job_id


async def test_an_item_finished_on_the_queue_gets_the_final_event_its_job_keeps(
    flow: Flow,
) -> None:
    batch = await submit(flow, [llm_item("only", "what is rag")])
    server = flow.running.server
    item = await delivered_and_started(server, batch)
    job_id = await job_ended_failed(server, batch)
    # The result went to the dead master; the queue's completion, elsewhere, stayed.
    assert await server.services.batch_queue.complete([(item, DONE)]) == [True]

    assert await server.services.batch_repair.repair_once() == 1

    (result,) = await read_results(stream(flow, batch.batch_id))
    assert result.state == batch_pb2.BATCH_ITEM_STATE_FAILED
    assert (result.job_id, result.error.code) == (job_id, "model_error")
    assert (await get_batch(flow, batch.batch_id)).state == batch_pb2.BATCH_STATE_COMPLETED


async def test_an_item_whose_job_is_gone_too_fails_lost_in_failover(flow: Flow) -> None:
    batch = await submit(flow, [llm_item("only", "what is rag")])
    server = flow.running.server
    item = await delivered_and_started(server, batch)
    assert await server.services.batch_queue.complete([(item, DONE)]) == [True]

    assert await server.services.batch_repair.repair_once() == 1

    (result,) = await read_results(stream(flow, batch.batch_id))
    assert result.state == batch_pb2.BATCH_ITEM_STATE_FAILED
    assert (result.error.code, result.error.retryable) == ("lost_in_failover", True)


async def test_an_item_the_queue_still_holds_is_left_to_its_delivery(flow: Flow) -> None:
    batch = await submit(flow, [llm_item("only", "what is rag")])
    server = flow.running.server
    await delivered_and_started(server, batch)
    await job_ended_failed(server, batch)

    assert await server.services.batch_repair.repair_once() == 0

    counts = (await get_batch(flow, batch.batch_id)).counts
    assert (counts.running, counts.failed) == (1, 0)


async def test_a_second_pass_settles_nothing_more(flow: Flow) -> None:
    batch = await submit(flow, [llm_item("only", "what is rag")])
    server = flow.running.server
    item = await delivered_and_started(server, batch)
    await job_ended_failed(server, batch)
    assert await server.services.batch_queue.complete([(item, DONE)]) == [True]
    repair = server.services.batch_repair

    assert await repair.repair_once() == 1
    assert await repair.repair_once() == 0

    assert len(await read_results(stream(flow, batch.batch_id))) == 1

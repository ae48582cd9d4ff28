"""A batch item delivered again after its worker died (its lease expired) follows the job the
earlier delivery started instead of running the item as a second job: a job still PENDING (the
worker died between recording it and the hand-off) is handed to its service again under the same
id, a running one is followed, a finished one gives its result at once, even when the batch
session's log no longer holds it. Both backends; the test plays the dead first delivery."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import pytest

from domain.batch_models import ItemStart
from domain.batch_runner import DONE, item_job_id
from domain.ids import new_id
from domain.jobs import IfBusy, NewJob, StartedJob
from domain.models import Service, WorkKind
from domain.ports.queue import WorkItem
from orchestrator.v1 import batch_pb2
from server.app import OrchestratorServer
from tests.support.admin_calls import tenant_usage
from tests.support.batches import NoticeDriver, llm_item, read_results, stream, submit
from tests.support.flow import Flow, completed, notice

LEASE_MS = 100


@pytest.fixture
def flow_settings() -> dict[str, Any]:
    # The test takes the items itself; the batch session's log keeps its last event only.
    return {"batch_worker_enabled": False, "event_log_max_events": 1}


async def died_after_recording_the_job(
    server: OrchestratorServer, batch: batch_pb2.Batch, content: str
) -> str:
    """What a first delivery of item 0 did before its worker was killed: it took the item,
    marked it running and recorded its job, but never handed the job to its service."""
    (item,) = await server.services.batch_queue.dequeue("dead", count=1, lease_ms=LEASE_MS)
    assert item.deliveries == 1
    store = server.backend.batches
    assert await store.start_item("acme", batch.batch_id, 0, redelivery=False)
    job_id = item_job_id(batch.batch_id, 0)
    new = NewJob(
        job_id,
        await session_of(server, batch),
        "batch",
        Service.QUERY,
        WorkKind.LLM_QUERY,
        content,
        batch.batch_id,
        keep_final=True,
    )
    started = await server.backend.jobs.start_job(
        "acme", new, server.services.limits, if_busy=IfBusy.RUN
    )
    assert isinstance(started, StartedJob)
    return job_id


async def session_of(server: OrchestratorServer, batch: batch_pb2.Batch) -> str:
    """The batch's internal session, which runs its LLM items."""
    stored = await server.backend.batches.get_batch("acme", batch.batch_id)
    assert stored is not None and stored.session_id
    return stored.session_id


async def redelivered(server: OrchestratorServer) -> WorkItem:
    """The item again, once the dead delivery's lease expired."""
    give_up = time.monotonic() + 10.0
    while time.monotonic() < give_up:
        items = await server.services.batch_queue.dequeue(
            "survivor", count=1, lease_ms=LEASE_MS, wait_ms=LEASE_MS
        )
        if items:
            return items[0]
    raise AssertionError("the item was not delivered again")


async def test_a_pending_job_is_handed_over_again_instead_of_starting_another(
    flow: Flow,
) -> None:
    batch = await submit(flow, [llm_item("only", "what is rag")])
    server = flow.running.server
    job_id = await died_after_recording_the_job(server, batch, "what is rag")
    item = await redelivered(server)
    assert item.deliveries == 2
    assert flow.dispatcher.submitted == []

    async with NoticeDriver(flow).running():
        assert await server.services.batch_runner.handle(item) == DONE

    assert [work.job_id for work, _ in flow.dispatcher.submitted] == [job_id]
    (result,) = await read_results(stream(flow, batch.batch_id))
    assert result.state == batch_pb2.BATCH_ITEM_STATE_COMPLETED
    assert (result.job_id, result.result.text) == (job_id, "re: what is rag")
    usage = await tenant_usage(flow.channel, "acme")
    assert (usage.completed_tasks, usage.total.total_tokens) == (1, 8)


async def test_a_running_job_is_followed_to_its_end(flow: Flow) -> None:
    batch = await submit(flow, [llm_item("only", "hello")])
    server = flow.running.server
    job_id = await died_after_recording_the_job(server, batch, "hello")
    await flow.publish([notice(job_id, 1, "progress", progress=0.5)])  # its service has it
    item = await redelivered(server)

    handled = asyncio.create_task(server.services.batch_runner.handle(item))
    await flow.publish([completed(job_id, 2, "the answer")])
    assert await asyncio.wait_for(handled, 10.0) == DONE

    assert flow.dispatcher.submitted == []
    (result,) = await read_results(stream(flow, batch.batch_id))
    assert (result.job_id, result.result.text) == (job_id, "the answer")
    usage = await tenant_usage(flow.channel, "acme")
    assert usage.completed_tasks == 1


async def test_a_finished_job_gives_its_result_after_the_log_dropped_it(flow: Flow) -> None:
    batch = await submit(flow, [llm_item("only", "hello")])
    server = flow.running.server
    job_id = await died_after_recording_the_job(server, batch, "hello")
    await flow.publish([completed(job_id, 1, "the answer")])
    # Another job on the batch's session: its accepted event pushes the first job's out of
    # the log.
    session_id = await session_of(server, batch)
    other = NewJob(new_id(), session_id, "batch", Service.QUERY, WorkKind.LLM_QUERY, "x", "r")
    await server.backend.jobs.start_job("acme", other, server.services.limits, if_busy=IfBusy.RUN)
    page = await server.backend.events.read_after("acme", session_id, 0, limit=100)
    assert [event.job_id for event in page.events] == [other.job_id]
    item = await redelivered(server)

    assert await server.services.batch_runner.handle(item) == DONE

    assert flow.dispatcher.submitted == []
    (result,) = await read_results(stream(flow, batch.batch_id))
    assert result.state == batch_pb2.BATCH_ITEM_STATE_COMPLETED
    assert (result.job_id, result.result.text) == (job_id, "the answer")
    assert result.usage.total_tokens == 8
    usage = await tenant_usage(flow.channel, "acme")
    assert usage.completed_tasks == 1


async def test_a_first_delivery_given_back_after_starting_its_job_follows_it(
    flow: Flow,
) -> None:
    """Given back at shutdown (uncounted): the next delivery is a first one again, but the
    item was left RUNNING (RESUMED), so the job is read and attached first, not started anew."""
    batch = await submit(flow, [llm_item("only", "hello")])
    server = flow.running.server
    queue, store = server.services.batch_queue, server.backend.batches
    (item,) = await queue.dequeue("stopping", count=1, lease_ms=60_000)
    assert await store.start_item("acme", batch.batch_id, 0, redelivery=True) is ItemStart.STARTED
    job_id = item_job_id(batch.batch_id, 0)
    new = NewJob(
        job_id,
        await session_of(server, batch),
        "batch",
        Service.QUERY,
        WorkKind.LLM_QUERY,
        "hello",
        batch.batch_id,
        keep_final=True,
    )
    started = await server.backend.jobs.start_job(
        "acme", new, server.services.limits, if_busy=IfBusy.RUN
    )
    assert isinstance(started, StartedJob)
    assert await queue.release(item)
    (again,) = await queue.dequeue("survivor", count=1, lease_ms=60_000)
    assert again.deliveries == 1

    async with NoticeDriver(flow).running():
        assert await server.services.batch_runner.handle(again) == DONE

    # The pending job was handed over again under its id, once; one result.
    assert [work.job_id for work, _ in flow.dispatcher.submitted] == [job_id]
    (result,) = await read_results(stream(flow, batch.batch_id))
    assert (result.job_id, result.result.text) == (job_id, "re: hello")
    assert (await tenant_usage(flow.channel, "acme")).completed_tasks == 1


async def test_a_queued_item_whose_job_exists_is_not_started_twice(flow: Flow) -> None:
    """A first delivery of a QUEUED item starts its job without reading it first; should the
    job exist all the same, the start finds it and the item follows it."""
    batch = await submit(flow, [llm_item("only", "hello")])
    server = flow.running.server
    job_id = item_job_id(batch.batch_id, 0)
    new = NewJob(
        job_id,
        await session_of(server, batch),
        "batch",
        Service.QUERY,
        WorkKind.LLM_QUERY,
        "hello",
        batch.batch_id,
        keep_final=True,
    )
    started = await server.backend.jobs.start_job(
        "acme", new, server.services.limits, if_busy=IfBusy.RUN
    )
    assert isinstance(started, StartedJob)
    (item,) = await server.services.batch_queue.dequeue("only", count=1, lease_ms=60_000)
    assert item.deliveries == 1

    async with NoticeDriver(flow).running():
        assert await server.services.batch_runner.handle(item) == DONE

    assert [work.job_id for work, _ in flow.dispatcher.submitted] == [job_id]
    (result,) = await read_results(stream(flow, batch.batch_id))
    assert (result.job_id, result.result.text) == (job_id, "re: hello")
    assert (await tenant_usage(flow.channel, "acme")).completed_tasks == 1


async def test_an_item_enqueued_without_its_batch_session_reads_it(flow: Flow) -> None:
    """Items enqueued before the payload named the batch's session find it in the batch."""
    batch = await submit(flow, [llm_item("only", "hello")])
    server = flow.running.server
    (item,) = await server.services.batch_queue.dequeue("only", count=1, lease_ms=60_000)
    spec = json.loads(item.payload)
    assert spec["session"] == await session_of(server, batch)
    older = dataclasses.replace(item, payload=json.dumps({**spec, "session": ""}).encode())

    async with NoticeDriver(flow).running():
        assert await server.services.batch_runner.handle(older) == DONE

    (result,) = await read_results(stream(flow, batch.batch_id))
    assert result.state == batch_pb2.BATCH_ITEM_STATE_COMPLETED


async def test_items_on_a_closed_batch_session_fail_without_reading_it(flow: Flow) -> None:
    """The start refuses a closed session even when the item does not read it first."""
    batch = await submit(flow, [llm_item(f"c{n}", "hello") for n in range(3)])
    server = flow.running.server
    await server.services.sessions.close("acme", await session_of(server, batch))
    items = await server.services.batch_queue.dequeue("only", count=3, lease_ms=60_000)
    assert len(items) == 3
    for item in items:
        assert await server.services.batch_runner.handle(item) == DONE

    results = await read_results(stream(flow, batch.batch_id))
    assert len(results) == 3 and flow.dispatcher.submitted == []
    assert {r.state for r in results} == {batch_pb2.BATCH_ITEM_STATE_FAILED}
    assert {r.error.code for r in results} == {"failed_precondition"}

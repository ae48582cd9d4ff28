"""The operator RPCs of AdminService over a real server, on both backends: ListTasks (filters,
paging, bad input), GetStats, dead letters of the real work queues (a queued message whose
consumers die on every delivery is dead-lettered, then redriven and run; a batch item a worker
gave up on is re-opened by its redrive and runs, unless its batch was cancelled or expired; a
queued message whose job the worker's giving up ended is not redriven), any session, its
events and any batch of a tenant, RevokeTenantKeys, tenant isolation, admin-only access and
one audit line per call."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from domain.identity import Role
from domain.ports.queue import WorkItem, WorkQueue
from domain.worker import ItemRunner, PermanentError, QueueWorker
from orchestrator.admin.v1 import admin_pb2, admin_pb2_grpc
from orchestrator.v1 import batch_pb2, batch_pb2_grpc, common_pb2, session_pb2, session_pb2_grpc
from tests.support.batches import batches, get_batch, llm_item, read_results, stream, submit
from tests.support.flow import Flow, completed, kind_of
from tests.support.keys import key_id_for
from tests.support.servers import (
    admin,
    bearer,
    running_server,
    service,
    tenant,
    test_settings,
)

CHAT = "chat"


@pytest.fixture
def flow_settings() -> dict[str, Any]:
    # Queued messages stay in the chat queue until a test starts the worker.
    return {"chat_worker_enabled": False, "job_queue_timeout": 60.0}


def stub(flow: Flow) -> admin_pb2_grpc.AdminServiceAsyncStub:
    return admin_pb2_grpc.AdminServiceStub(flow.channel)


async def list_tasks(flow: Flow, **fields: Any) -> admin_pb2.ListTasksResponse:
    reply: admin_pb2.ListTasksResponse = await stub(flow).ListTasks(
        admin_pb2.ListTasksRequest(**fields), metadata=admin()
    )
    return reply


async def all_task_ids(flow: Flow, **fields: Any) -> list[str]:
    ids: list[str] = []
    token = ""
    while True:
        page = await list_tasks(flow, page_token=token, **fields)
        ids += [task.job_id for task in page.tasks]
        token = page.next_page_token
        if not token:
            return ids


async def start_jobs(flow: Flow, count: int, tenant_id: str = "acme") -> list[str]:
    """``count`` jobs, each on a session of its own, oldest first."""
    ids = []
    for _ in range(count):
        session_id = await flow.new_session(tenant_id)
        _, accepted = await flow.start_job(session_id, tenant_id)
        ids.append(accepted.job_id)
    return ids


async def expect_error(call: Any, code: grpc.StatusCode, field: str = "") -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    assert field in (caught.value.details() or "")


async def queue_background(flow: Flow, tenant_id: str = "acme") -> tuple[str, str]:
    """A background message (a QUEUED job on the chat queue): (session id, job id)."""
    session_id = await flow.new_session(tenant_id)
    call = flow.send(session_id, "later", tenant_id=tenant_id, background=True)
    first = await call.read()
    assert kind_of(first.event) == "accepted" and first.event.accepted.queued
    call.cancel()
    return session_id, first.event.job_id


async def kill_every_delivery(queue: WorkQueue, item_id: str) -> None:
    """Consumers that take the item and die (never complete, fail or renew it): once every
    delivery's lease ran out, the queue dead-letters it. Nothing else may be ready then."""
    async with asyncio.timeout(20):
        while await queue.get_dead(item_id) is None:
            for item in await queue.dequeue("doomed", count=1, lease_ms=40, wait_ms=200):
                assert item.item_id == item_id


async def dead_background(flow: Flow, tenant_id: str = "acme") -> tuple[str, str]:
    """A background message whose work item was dead-lettered: (session id, job id)."""
    session_id, job_id = await queue_background(flow, tenant_id)
    await kill_every_delivery(flow.running.server.services.chat_queue, job_id)
    return session_id, job_id


# ListTasks ------------------------------------------------------------------------------------


async def test_list_tasks_pages_through_a_tenants_tasks_newest_first(flow: Flow) -> None:
    made = await start_jobs(flow, 5)
    await start_jobs(flow, 1, tenant_id="globex")
    seen = await all_task_ids(flow, tenant_id="acme", page_size=2)
    assert seen == list(reversed(made))
    first = await list_tasks(flow, tenant_id="acme", page_size=2)
    assert len(first.tasks) == 2 and first.next_page_token
    assert all(task.tenant_id == "acme" for task in first.tasks)


async def test_list_tasks_filters_by_state_session_agent_and_service(flow: Flow) -> None:
    done, running = await start_jobs(flow, 2)
    await flow.publish([completed(done, 1, "ok")])
    completed_ids = await all_task_ids(
        flow, tenant_id="acme", states=[admin_pb2.TASK_STATE_COMPLETED]
    )
    assert completed_ids == [done]
    pending = await all_task_ids(flow, tenant_id="acme", states=[admin_pb2.TASK_STATE_PENDING])
    assert pending == [running]
    task = (await list_tasks(flow, tenant_id="acme", page_size=1)).tasks[0]
    assert await all_task_ids(flow, tenant_id="acme", session_id=task.session_id) == [task.job_id]
    both = await all_task_ids(flow, tenant_id="acme", agent_id="agent-1")
    assert sorted(both) == sorted([done, running])
    assert await all_task_ids(flow, tenant_id="acme", agent_id="other") == []
    assert sorted(
        await all_task_ids(flow, tenant_id="acme", service=common_pb2.SERVICE_QUERY)
    ) == sorted([done, running])
    assert await all_task_ids(flow, tenant_id="acme", service=common_pb2.SERVICE_EMBEDDING) == []


async def test_list_tasks_filters_by_create_time_range(flow: Flow) -> None:
    (older,) = await start_jobs(flow, 1)
    older_task = (await list_tasks(flow, tenant_id="acme")).tasks[0]
    await asyncio.sleep(0.002)  # a later create time (nothing to await: only time)
    (newer,) = await start_jobs(flow, 1)
    newer_task = next(
        t for t in (await list_tasks(flow, tenant_id="acme")).tasks if t.job_id == newer
    )
    assert newer_task.create_time != older_task.create_time
    split = newer_task.create_time
    assert await all_task_ids(flow, tenant_id="acme", create_time_from=split) == [newer]
    assert await all_task_ids(flow, tenant_id="acme", create_time_to=split) == [older]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({}, "tenant_id"),
        ({"tenant_id": "{bad}"}, "tenant_id"),
        ({"tenant_id": "acme", "states": [admin_pb2.TASK_STATE_UNSPECIFIED]}, "states"),
        (
            {"tenant_id": "acme", "states": [admin_pb2.TASK_STATE_QUEUED] * 2},
            "states",
        ),
        ({"tenant_id": "acme", "service": 99}, "service"),
        ({"tenant_id": "acme", "agent_id": "a" * 129}, "agent_id"),
        ({"tenant_id": "acme", "session_id": "not a session"}, "session_id"),
        ({"tenant_id": "acme", "page_size": -1}, "page_size"),
        ({"tenant_id": "acme", "page_token": "%%%"}, "page_token"),
        (
            {
                "tenant_id": "acme",
                "create_time_from": timestamp_pb2.Timestamp(seconds=20),
                "create_time_to": timestamp_pb2.Timestamp(seconds=10),
            },
            "create_time_to",
        ),
    ],
)
async def test_list_tasks_refuses_bad_input_naming_the_field(
    flow: Flow, fields: dict[str, Any], field: str
) -> None:
    await expect_error(
        stub(flow).ListTasks(admin_pb2.ListTasksRequest(**fields), metadata=admin()),
        grpc.StatusCode.INVALID_ARGUMENT,
        field,
    )


async def test_a_list_tasks_page_token_of_another_tenant_or_filter_is_refused(flow: Flow) -> None:
    await start_jobs(flow, 2)
    token = (await list_tasks(flow, tenant_id="acme", page_size=1)).next_page_token
    assert token
    for other in (
        admin_pb2.ListTasksRequest(tenant_id="globex", page_token=token),
        admin_pb2.ListTasksRequest(tenant_id="acme", agent_id="agent-1", page_token=token),
    ):
        await expect_error(
            stub(flow).ListTasks(other, metadata=admin()),
            grpc.StatusCode.INVALID_ARGUMENT,
            "page_token",
        )


# GetStats -------------------------------------------------------------------------------------


def tasks_by_state(reply: admin_pb2.GetStatsResponse) -> dict[int, int]:
    return {entry.state: entry.count for entry in reply.tasks}


async def test_stats_count_a_tenants_tasks_in_flight_and_tokens_today(flow: Flow) -> None:
    done, _ = await start_jobs(flow, 2)
    await start_jobs(flow, 3, tenant_id="globex")
    await flow.publish([completed(done, 1, "ok")])  # 8 tokens
    acme = await stub(flow).GetStats(admin_pb2.GetStatsRequest(tenant_id="acme"), metadata=admin())
    assert acme.tenant_id == "acme"
    assert tasks_by_state(acme)[admin_pb2.TASK_STATE_PENDING] == 1
    assert acme.tokens_today == 8
    everyone = await stub(flow).GetStats(admin_pb2.GetStatsRequest(), metadata=admin())
    assert everyone.tenant_id == ""
    assert tasks_by_state(everyone)[admin_pb2.TASK_STATE_PENDING] == 4
    assert everyone.tokens_today == 8


async def test_stats_show_queue_depth_and_dead_letters_per_tenant(flow: Flow) -> None:
    await dead_background(flow, tenant_id="globex")
    await queue_background(flow)

    async def depth(tenant_id: str) -> tuple[int, int, int]:
        reply = await stub(flow).GetStats(
            admin_pb2.GetStatsRequest(tenant_id=tenant_id), metadata=admin()
        )
        normal = next(
            q for q in reply.queues if q.queue == CHAT and q.priority == common_pb2.PRIORITY_NORMAL
        )
        assert tasks_by_state(reply)[admin_pb2.TASK_STATE_QUEUED] == 1
        return normal.ready, normal.dead, reply.dead_letters

    assert await depth("acme") == (1, 0, 0)
    assert await depth("globex") == (0, 1, 1)
    everyone = await stub(flow).GetStats(admin_pb2.GetStatsRequest(), metadata=admin())
    assert everyone.dead_letters == 1
    assert {q.queue for q in everyone.queues} == {CHAT, "batch"}


# Dead letters ---------------------------------------------------------------------------------


async def test_a_dead_letter_is_listed_inspected_and_redriven_until_its_job_runs(
    flow: Flow,
) -> None:
    session_id, job_id = await dead_background(flow)
    admin_stub = stub(flow)
    listed = await admin_stub.ListDeadLetters(
        admin_pb2.ListDeadLettersRequest(queue=CHAT, tenant_id="acme"), metadata=admin()
    )
    assert [d.item_id for d in listed.dead_letters] == [job_id]
    letter = listed.dead_letters[0]
    assert letter.tenant_id == "acme" and letter.queue == CHAT and letter.deliveries == 5
    assert letter.error and letter.payload == b""
    inspected = await admin_stub.GetDeadLetter(
        admin_pb2.GetDeadLetterRequest(queue=CHAT, item_id=job_id), metadata=admin()
    )
    assert job_id.encode() in inspected.dead_letter.payload
    await admin_stub.RedriveDeadLetter(
        admin_pb2.RedriveDeadLetterRequest(queue=CHAT, item_id=job_id), metadata=admin()
    )
    assert not (
        await admin_stub.ListDeadLetters(
            admin_pb2.ListDeadLettersRequest(queue=CHAT), metadata=admin()
        )
    ).dead_letters
    # A live worker now takes the redriven item and runs the job to its end.
    flow.running.server.workers.start_chat_worker()
    work = await flow.dispatcher.next_submit()
    assert work.job_id == job_id and work.content == "later"
    await flow.publish([completed(job_id, 1, "done at last")])
    async with asyncio.timeout(10):
        while True:
            task = await admin_stub.GetTask(
                admin_pb2.GetTaskRequest(tenant_id="acme", job_id=job_id), metadata=admin()
            )
            if task.task.state == admin_pb2.TASK_STATE_COMPLETED:
                break
            await flow.running.server.services.chat_queue.wait_result(job_id, 1.0)
    assert task.task.session_id == session_id


async def test_a_dead_batch_item_is_listed_and_inspected_by_its_item_id(flow: Flow) -> None:
    batches = batch_pb2_grpc.BatchServiceStub(flow.channel)
    submitted = await batches.SubmitBatch(
        batch_pb2.SubmitBatchRequest(
            items=[
                batch_pb2.BatchItem(
                    custom_id="one", content="hi", kind=batch_pb2.BATCH_ITEM_KIND_LLM_QUERY
                )
            ]
        ),
        metadata=tenant("acme"),
    )
    batch_id = submitted.batch.batch_id
    item_id = f"{batch_id}/0"
    await kill_every_delivery(flow.running.server.services.batch_queue, item_id)
    listed = await stub(flow).ListDeadLetters(
        admin_pb2.ListDeadLettersRequest(queue="batch"), metadata=admin()
    )
    assert [(d.item_id, d.batch_id, d.tenant_id) for d in listed.dead_letters] == [
        (item_id, batch_id, "acme")
    ]
    inspected = await stub(flow).GetDeadLetter(
        admin_pb2.GetDeadLetterRequest(queue="batch", item_id=item_id), metadata=admin()
    )
    assert b"hi" in inspected.dead_letter.payload


async def test_redriving_what_is_not_dead_lettered_is_not_found(flow: Flow) -> None:
    _, job_id = await queue_background(flow)
    for call in (
        stub(flow).RedriveDeadLetter(
            admin_pb2.RedriveDeadLetterRequest(queue=CHAT, item_id=job_id), metadata=admin()
        ),
        stub(flow).GetDeadLetter(
            admin_pb2.GetDeadLetterRequest(queue="batch", item_id=job_id), metadata=admin()
        ),
    ):
        await expect_error(call, grpc.StatusCode.NOT_FOUND)


async def test_dead_letters_page_and_filter_by_tenant(flow: Flow) -> None:
    acme = [(await dead_background(flow))[1] for _ in range(2)]
    await dead_background(flow, tenant_id="globex")
    acme.append((await dead_background(flow))[1])
    seen: list[str] = []
    token = ""
    while True:
        page = await stub(flow).ListDeadLetters(
            admin_pb2.ListDeadLettersRequest(
                queue=CHAT, tenant_id="acme", page_size=2, page_token=token
            ),
            metadata=admin(),
        )
        assert len(page.dead_letters) <= 2
        seen += [d.item_id for d in page.dead_letters]
        token = page.next_page_token
        if not token:
            break
    assert seen == acme
    await expect_error(
        stub(flow).ListDeadLetters(
            admin_pb2.ListDeadLettersRequest(
                queue=CHAT, tenant_id="globex", page_token=token or "x"
            ),
            metadata=admin(),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "page_token",
    )


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (admin_pb2.ListDeadLettersRequest(), "queue"),
        (admin_pb2.ListDeadLettersRequest(queue="nope"), "queue"),
        (admin_pb2.GetDeadLetterRequest(queue=CHAT), "item_id"),
        (admin_pb2.RedriveDeadLetterRequest(queue=CHAT, item_id="x" * 200), "item_id"),
        (admin_pb2.GetDeadLetterRequest(queue="batch", item_id="not-an-id/0"), "item_id"),
    ],
)
async def test_dead_letter_calls_refuse_bad_input_naming_the_field(
    flow: Flow, request_: Any, field: str
) -> None:
    method = {
        admin_pb2.ListDeadLettersRequest: stub(flow).ListDeadLetters,
        admin_pb2.GetDeadLetterRequest: stub(flow).GetDeadLetter,
        admin_pb2.RedriveDeadLetterRequest: stub(flow).RedriveDeadLetter,
    }[type(request_)]
    await expect_error(
        method(request_, metadata=admin()),  # type: ignore[operator]
        grpc.StatusCode.INVALID_ARGUMENT,
        field,
    )


# Redrive: what a worker gave up on runs again, or the operator is told why not ---------------


async def give_up_on_next(queue: WorkQueue, runner: ItemRunner) -> WorkItem:
    """A worker whose handler fails for good (PermanentError): the queue dead-letters the next
    ready item and the worker tells the item's owner through the runner's dead-letter hook,
    as the server's workers do when they give up. The worker stops right after."""
    given_up: asyncio.Future[WorkItem] = asyncio.get_running_loop().create_future()

    async def refuse(item: WorkItem) -> bytes:
        raise PermanentError("the downstream refused it")

    async def hook(item: WorkItem, error: str) -> None:
        worker.stop()
        await runner.dead_lettered(item, error)
        given_up.set_result(item)

    worker = QueueWorker(
        queue, refuse, concurrency=1, consumer="doomed", poll_s=0.05, on_dead_letter=hook
    )
    task = asyncio.create_task(worker.run())
    async with asyncio.timeout(10):
        item = await given_up
        await task
    return item


async def dead_item_ids(flow: Flow, queue: str) -> list[str]:
    listed = await stub(flow).ListDeadLetters(
        admin_pb2.ListDeadLettersRequest(queue=queue), metadata=admin()
    )
    return [letter.item_id for letter in listed.dead_letters]


def redrive(flow: Flow, queue: str, item_id: str) -> Any:
    return stub(flow).RedriveDeadLetter(
        admin_pb2.RedriveDeadLetterRequest(queue=queue, item_id=item_id), metadata=admin()
    )


async def test_a_batch_item_given_up_on_is_redriven_runs_and_its_result_replaces_the_failure(
    flow: Flow,
) -> None:
    batch = await submit(flow, [llm_item("first"), llm_item("second")])
    server = flow.running.server
    dead = await give_up_on_next(server.services.batch_queue, server.services.batch_runner)
    server.workers.start_batch_worker()
    other = await flow.dispatcher.next_submit()
    await flow.publish([completed(other.job_id, 1, "ran first time")])
    failed = await read_results(stream(flow, batch.batch_id))
    assert sorted(r.error.code for r in failed) == ["", "dead_lettered"]
    ended = await get_batch(flow, batch.batch_id)
    assert ended.state == batch_pb2.BATCH_STATE_COMPLETED
    assert (ended.counts.completed, ended.counts.failed) == (1, 1)

    await redrive(flow, "batch", dead.item_id)
    reopened = await get_batch(flow, batch.batch_id)
    assert reopened.state == batch_pb2.BATCH_STATE_IN_PROGRESS
    counts = reopened.counts
    assert (counts.completed, counts.failed, counts.queued + counts.running) == (1, 0, 1)
    assert await dead_item_ids(flow, "batch") == []
    work = await flow.dispatcher.next_submit()
    assert work.job_id != other.job_id
    await flow.publish([completed(work.job_id, 1, "ran after the redrive")])

    results = await read_results(stream(flow, batch.batch_id))
    assert [r.state for r in results] == [batch_pb2.BATCH_ITEM_STATE_COMPLETED] * 2
    assert {r.custom_id: r.result.text for r in results} == {
        "first" if dead.item_id.endswith("/0") else "second": "ran after the redrive",
        "second" if dead.item_id.endswith("/0") else "first": "ran first time",
    }
    final = await get_batch(flow, batch.batch_id)
    assert final.state == batch_pb2.BATCH_STATE_COMPLETED
    c = final.counts
    assert (c.total, c.completed, c.failed, c.queued, c.running) == (2, 2, 0, 0, 0)


@pytest.mark.parametrize("stop", ["cancelled", "expired"])
async def test_a_batch_item_of_a_stopped_batch_is_not_redriven_and_stays_dead(
    flow: Flow, stop: str
) -> None:
    window: dict[str, Any] = {"completion_window": {"seconds": 1}} if stop == "expired" else {}
    batch = await submit(flow, [llm_item("first"), llm_item("second")], **window)
    server = flow.running.server
    dead = await give_up_on_next(server.services.batch_queue, server.services.batch_runner)
    if stop == "cancelled":
        await batches(flow).CancelBatch(
            batch_pb2.CancelBatchRequest(batch_id=batch.batch_id), metadata=tenant("acme")
        )
    # The result stream ends once the batch is final: cancelled now, or expired after its window.
    results = await read_results(stream(flow, batch.batch_id))
    assert len(results) == 2
    assert (await get_batch(flow, batch.batch_id)).state == getattr(
        batch_pb2, f"BATCH_STATE_{stop.upper()}"
    )
    await expect_error(
        redrive(flow, "batch", dead.item_id), grpc.StatusCode.FAILED_PRECONDITION, stop
    )
    assert await dead_item_ids(flow, "batch") == [dead.item_id]
    after = await get_batch(flow, batch.batch_id)
    assert after.counts.failed == 1 and after.counts.queued == after.counts.running == 0


async def test_a_batch_item_whose_deliveries_all_died_is_redriven_and_runs(flow: Flow) -> None:
    batch = await submit(flow, [llm_item("only")])
    item_id = f"{batch.batch_id}/0"
    await kill_every_delivery(flow.running.server.services.batch_queue, item_id)
    await redrive(flow, "batch", item_id)
    flow.running.server.workers.start_batch_worker()
    work = await flow.dispatcher.next_submit()
    await flow.publish([completed(work.job_id, 1, "ran")])
    (result,) = await read_results(stream(flow, batch.batch_id))
    assert result.custom_id == "only" and result.result.text == "ran"
    final = await get_batch(flow, batch.batch_id)
    assert final.state == batch_pb2.BATCH_STATE_COMPLETED and final.counts.completed == 1


async def test_a_queued_message_whose_job_ended_is_not_redriven_and_stays_dead(
    flow: Flow,
) -> None:
    _, job_id = await queue_background(flow)
    server = flow.running.server
    dead = await give_up_on_next(server.services.chat_queue, server.services.chat_runner)
    assert dead.item_id == job_id
    task = await stub(flow).GetTask(
        admin_pb2.GetTaskRequest(tenant_id="acme", job_id=job_id), metadata=admin()
    )
    assert task.task.state == admin_pb2.TASK_STATE_FAILED
    await expect_error(
        redrive(flow, CHAT, job_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        f"job {job_id} already ended failed; send the message again",
    )
    assert await dead_item_ids(flow, CHAT) == [job_id]


# Sessions, events and batches -----------------------------------------------------------------


async def test_an_operator_reads_any_session_and_pages_through_its_events(flow: Flow) -> None:
    session_id = await flow.new_session()
    _, accepted = await flow.start_job(session_id)
    await flow.publish([completed(accepted.job_id, 1, "ok")])
    reply = await stub(flow).GetSession(
        admin_pb2.GetSessionRequest(tenant_id="acme", session_id=session_id), metadata=admin()
    )
    assert reply.session.session_id == session_id
    assert reply.session.agent_id == "agent-1"
    kinds: list[str] = []
    token = ""
    while True:
        page = await stub(flow).ListSessionEvents(
            admin_pb2.ListSessionEventsRequest(
                tenant_id="acme", session_id=session_id, page_size=1, page_token=token
            ),
            metadata=admin(),
        )
        assert len(page.events) <= 1 and page.last_sequence == 2
        kinds += [kind_of(event) for event in page.events]
        token = page.next_page_token
        if not token:
            break
    assert kinds == ["accepted", "completed"]


async def test_an_operator_reads_any_batch(flow: Flow) -> None:
    batches = batch_pb2_grpc.BatchServiceStub(flow.channel)
    submitted = await batches.SubmitBatch(
        batch_pb2.SubmitBatchRequest(
            items=[
                batch_pb2.BatchItem(
                    custom_id="one", content="hi", kind=batch_pb2.BATCH_ITEM_KIND_LLM_QUERY
                )
            ]
        ),
        metadata=tenant("acme"),
    )
    reply = await stub(flow).GetBatch(
        admin_pb2.GetBatchRequest(tenant_id="acme", batch_id=submitted.batch.batch_id),
        metadata=admin(),
    )
    assert reply.batch.batch_id == submitted.batch.batch_id
    assert reply.batch.counts.total == 1


async def test_sessions_and_batches_of_another_tenant_are_not_found(flow: Flow) -> None:
    session_id = await flow.new_session("acme")
    batches = batch_pb2_grpc.BatchServiceStub(flow.channel)
    submitted = await batches.SubmitBatch(
        batch_pb2.SubmitBatchRequest(
            items=[
                batch_pb2.BatchItem(
                    custom_id="a", content="x", kind=batch_pb2.BATCH_ITEM_KIND_LLM_QUERY
                )
            ]
        ),
        metadata=tenant("acme"),
    )
    admin_stub = stub(flow)
    for call in (
        admin_stub.GetSession(
            admin_pb2.GetSessionRequest(tenant_id="globex", session_id=session_id),
            metadata=admin(),
        ),
        admin_stub.ListSessionEvents(
            admin_pb2.ListSessionEventsRequest(tenant_id="globex", session_id=session_id),
            metadata=admin(),
        ),
        admin_stub.GetBatch(
            admin_pb2.GetBatchRequest(tenant_id="globex", batch_id=submitted.batch.batch_id),
            metadata=admin(),
        ),
    ):
        await expect_error(call, grpc.StatusCode.NOT_FOUND)
    assert await all_task_ids(flow, tenant_id="globex") == []


# RevokeTenantKeys -----------------------------------------------------------------------------


async def test_revoking_a_tenants_keys_refuses_all_of_them_and_no_other(flow: Flow) -> None:
    admin_stub = stub(flow)

    async def new_key(tenant_id: str) -> admin_pb2.CreateApiKeyResponse:
        reply: admin_pb2.CreateApiKeyResponse = await admin_stub.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant_id=tenant_id, role=admin_pb2.API_KEY_ROLE_CLIENT),
            metadata=admin(),
        )
        return reply

    first, second, other = await new_key("acme"), await new_key("acme"), await new_key("globex")
    revoked = await admin_stub.RevokeTenantKeys(
        admin_pb2.RevokeTenantKeysRequest(tenant_id="acme"), metadata=admin()
    )
    assert list(revoked.revoked_key_ids) == sorted([first.key_id, second.key_id])
    for key in (first, second):
        await expect_error(
            flow.sessions.CreateSession(
                session_pb2.CreateSessionRequest(agent_id="a"), metadata=(bearer(key.api_key),)
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    await flow.sessions.CreateSession(
        session_pb2.CreateSessionRequest(agent_id="a"), metadata=(bearer(other.api_key),)
    )
    again = await admin_stub.RevokeTenantKeys(
        admin_pb2.RevokeTenantKeysRequest(tenant_id="acme"), metadata=admin()
    )
    assert list(again.revoked_key_ids) == []


async def test_revoking_keys_needs_a_valid_tenant(flow: Flow) -> None:
    await expect_error(
        stub(flow).RevokeTenantKeys(admin_pb2.RevokeTenantKeysRequest(), metadata=admin()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tenant_id",
    )


# Access and audit -----------------------------------------------------------------------------

OPERATOR_CALLS = [
    ("ListTasks", admin_pb2.ListTasksRequest(tenant_id="acme")),
    ("GetStats", admin_pb2.GetStatsRequest()),
    ("ListDeadLetters", admin_pb2.ListDeadLettersRequest(queue=CHAT)),
    ("GetDeadLetter", admin_pb2.GetDeadLetterRequest(queue=CHAT, item_id="x")),
    ("RedriveDeadLetter", admin_pb2.RedriveDeadLetterRequest(queue=CHAT, item_id="x")),
    ("GetSession", admin_pb2.GetSessionRequest(tenant_id="acme", session_id="x")),
    ("ListSessionEvents", admin_pb2.ListSessionEventsRequest(tenant_id="acme", session_id="x")),
    ("GetBatch", admin_pb2.GetBatchRequest(tenant_id="acme", batch_id="x")),
    ("RevokeTenantKeys", admin_pb2.RevokeTenantKeysRequest(tenant_id="acme")),
]


@pytest.mark.parametrize(("method", "request_"), OPERATOR_CALLS)
async def test_client_and_service_keys_cannot_call_operator_rpcs(
    flow: Flow, method: str, request_: Any
) -> None:
    for metadata in (tenant("acme"), service()):
        await expect_error(
            getattr(stub(flow), method)(request_, metadata=metadata),
            grpc.StatusCode.PERMISSION_DENIED,
        )


class AuditLogged(logging.Handler):
    """Sets ``event`` when an audit line is logged (in the test's own loop thread)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.event.set()


@pytest.mark.parametrize(("method", "request_"), OPERATOR_CALLS)
async def test_every_operator_rpc_writes_one_audit_line(
    flow: Flow, method: str, request_: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="orchestrator.audit")
    logged = AuditLogged()
    logging.getLogger("orchestrator.audit").addHandler(logged)
    try:
        try:
            await getattr(stub(flow), method)(request_, metadata=admin())
            outcome = "OK"
        except grpc.aio.AioRpcError as error:
            outcome = error.code().name
        # A refused call's status can reach the client before the server's handler has run
        # the audit's `finally` (both on this loop): wait for the line, not for the reply.
        await asyncio.wait_for(logged.event.wait(), 10)
    finally:
        logging.getLogger("orchestrator.audit").removeHandler(logged)
    lines = [r for r in caplog.records if r.name == "orchestrator.audit"]
    assert len(lines) == 1
    line: Any = lines[0]
    assert line.audit_method == method
    assert line.audit_key_id == key_id_for("platform", Role.ADMIN)
    assert line.audit_tenant == "platform"
    assert line.audit_outcome == outcome
    assert line.audit_time
    message = line.getMessage()
    assert f"method={method}" in message and f"outcome={outcome}" in message


async def test_an_audit_line_names_the_target_and_the_failure(
    flow: Flow, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="orchestrator.audit")
    await expect_error(
        stub(flow).GetTask(
            admin_pb2.GetTaskRequest(
                tenant_id="acme", job_id="0190aaaa-bbbb-7ccc-8ddd-eeeeffff0000"
            ),
            metadata=admin(),
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    (line,) = [r for r in caplog.records if r.name == "orchestrator.audit"]
    message = line.getMessage()
    assert "method=GetTask" in message
    assert "tenant_id=acme job_id=0190aaaa-bbbb-7ccc-8ddd-eeeeffff0000" in message
    assert "outcome=NOT_FOUND" in message


async def test_an_audit_line_quotes_a_hostile_target(
    flow: Flow, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="orchestrator.audit")
    await expect_error(
        stub(flow).ListTasks(
            admin_pb2.ListTasksRequest(tenant_id="acme\noutcome=OK"), metadata=admin()
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    line: Any
    (line,) = [r for r in caplog.records if r.name == "orchestrator.audit"]
    message = line.getMessage()
    assert "\n" not in message
    assert 'tenant_id="acme\\noutcome=OK"' in message
    assert message.endswith(line.audit_time) and "outcome=INVALID_ARGUMENT" in message


async def test_keys_revoked_on_one_replica_are_refused_by_another_at_once(redis_url: str) -> None:
    async with (
        running_server(test_settings(redis_url)) as replica_a,
        running_server(test_settings(redis_url)) as replica_b,
    ):
        created = await admin_pb2_grpc.AdminServiceStub(replica_a.channel).CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant_id="acme", role=admin_pb2.API_KEY_ROLE_CLIENT),
            metadata=admin(),
        )
        sessions_b = session_pb2_grpc.SessionServiceStub(replica_b.channel)
        await sessions_b.CreateSession(
            session_pb2.CreateSessionRequest(agent_id="a"), metadata=(bearer(created.api_key),)
        )
        await admin_pb2_grpc.AdminServiceStub(replica_a.channel).RevokeTenantKeys(
            admin_pb2.RevokeTenantKeysRequest(tenant_id="acme"), metadata=admin()
        )
        await expect_error(
            sessions_b.CreateSession(
                session_pb2.CreateSessionRequest(agent_id="a"),
                metadata=(bearer(created.api_key),),
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        )

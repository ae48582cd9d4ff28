"""BatchService against a real server on both backends, with the notices played by a driver."""

from __future__ import annotations

import collections
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

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


async def test_a_thousand_items_with_failures_count_and_stream_exactly_once(flow: Flow) -> None:
    items = [
        llm_item(f"item-{n}", ("fail " if n % 7 == 0 else "ask ") + str(n)) for n in range(1000)
    ]
    async with NoticeDriver(flow).running():
        batch = await submit(flow, items, priority=common_pb2.PRIORITY_HIGH)
        assert batch.state == S.BATCH_STATE_QUEUED and batch.counts.total == 1000
        results = await read_results(stream(flow, batch.batch_id), timeout_s=60.0)
    assert len(results) == 1000
    assert [r.sequence for r in results] == list(range(1, 1001))
    by_id = collections.Counter(r.custom_id for r in results)
    assert set(by_id.values()) == {1} and len(by_id) == 1000
    failed = {r.custom_id for r in results if r.state == S.BATCH_ITEM_STATE_FAILED}
    assert failed == {f"item-{n}" for n in range(0, 1000, 7)}
    done = [r for r in results if r.state == S.BATCH_ITEM_STATE_COMPLETED]
    assert done[0].result.text.startswith("re: ask") and done[0].usage.total_tokens == 8
    assert all(r.job_id for r in results)
    final = await get_batch(flow, batch.batch_id)
    assert final.state == S.BATCH_STATE_COMPLETED
    c = final.counts
    assert (c.total, c.completed, c.failed, c.queued, c.running) == (1000, 857, 143, 0, 0)
    assert final.HasField("finish_time")


async def test_results_resume_from_a_cursor(flow: Flow) -> None:
    async with NoticeDriver(flow).running():
        batch = await submit(flow, [llm_item(f"r{n}") for n in range(5)])
        first = await read_results(stream(flow, batch.batch_id), count=2)
        rest = await read_results(stream(flow, batch.batch_id, after=first[-1].sequence))
    assert [r.sequence for r in first] == [1, 2]
    assert [r.sequence for r in rest] == [3, 4, 5]
    assert {r.custom_id for r in first + rest} == {f"r{n}" for n in range(5)}
    # A finished batch replays from any cursor and ends.
    again = await read_results(stream(flow, batch.batch_id, after=4))
    assert [r.sequence for r in again] == [5]


async def test_chat_rag_and_embedding_items_run_through_the_chat_flow(flow: Flow) -> None:
    session_id = await flow.new_session()
    missing = "01890000-0000-7000-8000-000000000000"
    items = [
        S.BatchItem(
            custom_id="chat",
            kind=S.BATCH_ITEM_KIND_CHAT_MESSAGE,
            session_id=session_id,
            content="hi",
        ),
        S.BatchItem(
            custom_id="gone",
            kind=S.BATCH_ITEM_KIND_CHAT_MESSAGE,
            session_id=missing,
            content="hi",
        ),
        S.BatchItem(
            custom_id="rag", kind=S.BATCH_ITEM_KIND_RAG_QUERY, content="q", collections=["c1"]
        ),
        S.BatchItem(custom_id="emb", kind=S.BATCH_ITEM_KIND_EMBEDDING, content="text"),
    ]
    async with NoticeDriver(flow).running():
        follow = flow.follow(session_id)
        batch = await submit(flow, items)
        results = {r.custom_id: r for r in await read_results(stream(flow, batch.batch_id))}
        accepted = await follow.read()
    assert results["chat"].state == S.BATCH_ITEM_STATE_COMPLETED
    assert results["chat"].result.text == "re: hi"
    # The chat item's job is on the caller's session and its events reach that session.
    assert accepted.event.job_id == results["chat"].job_id
    assert results["gone"].state == S.BATCH_ITEM_STATE_FAILED
    assert results["gone"].error.code == "not_found" and not results["gone"].job_id
    assert results["rag"].state == S.BATCH_ITEM_STATE_COMPLETED
    assert results["emb"].state == S.BATCH_ITEM_STATE_COMPLETED
    kinds = {w.content: (w.kind.value, w.session_id) for w, _ in flow.dispatcher.submitted}
    assert kinds["q"][0] == "rag_query" and kinds["text"][0] == "embedding"
    # Items without a session share the batch's internal session.
    assert kinds["q"][1] == kinds["text"][1] != session_id
    counts = (await get_batch(flow, batch.batch_id)).counts
    assert (counts.completed, counts.failed) == (3, 1)


async def test_the_same_idempotency_key_returns_the_same_batch(flow: Flow) -> None:
    async with NoticeDriver(flow).running():
        first = await submit(flow, [llm_item("a")], idempotency_key="k-1")
        again = await submit(flow, [llm_item("a"), llm_item("b")], idempotency_key="k-1")
        other = await submit(flow, [llm_item("a")], tenant_id="globex", idempotency_key="k-1")
        await read_results(stream(flow, first.batch_id))
        await read_results(stream(flow, other.batch_id, tenant_id="globex"))
    assert again.batch_id == first.batch_id and again.counts.total == 1
    assert other.batch_id != first.batch_id
    assert len(flow.dispatcher.submitted) == 2  # one item of each tenant's batch ran


async def test_validation_names_the_item_and_field(flow: Flow) -> None:
    items = [
        llm_item("ok"),
        llm_item("ok"),
        S.BatchItem(custom_id="c", kind=S.BATCH_ITEM_KIND_CHAT_MESSAGE, content="x"),
        llm_item("e", content=" "),
        S.BatchItem(custom_id="k", content="x"),
    ]
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await submit(flow, items)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(error.value)  # type: ignore[arg-type]
    assert status is not None
    detail = error_details_pb2.BadRequest()
    status.details[0].Unpack(detail)
    fields = [v.field for v in detail.field_violations]
    assert fields == [
        "items[1].custom_id",
        "items[2].session_id",
        "items[3].content",
        "items[4].kind",
    ]
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await submit(flow, [])
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items" in (empty.value.details() or "")


async def test_another_tenants_batch_is_not_found(flow: Flow) -> None:
    async with NoticeDriver(flow).running():
        batch = await submit(flow, [llm_item("a")])
        await read_results(stream(flow, batch.batch_id))
    stub = batches(flow)
    other = tenant("globex")
    calls: list[Any] = [
        stub.GetBatch(S.GetBatchRequest(batch_id=batch.batch_id), metadata=other),
        stub.CancelBatch(S.CancelBatchRequest(batch_id=batch.batch_id), metadata=other),
        read_results(stream(flow, batch.batch_id, tenant_id="globex")),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.GetBatch(S.GetBatchRequest(batch_id="nope"), metadata=tenant("acme"))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    listed = await stub.ListBatches(S.ListBatchesRequest(), metadata=other)
    assert list(listed.batches) == []


async def test_list_batches_pages_newest_first_and_filters(flow: Flow) -> None:
    async with NoticeDriver(flow).running():
        ids = [(await submit(flow, [llm_item("a")])).batch_id for _ in range(3)]
        for batch_id in ids:
            await read_results(stream(flow, batch_id))
    stub = batches(flow)
    page = await stub.ListBatches(S.ListBatchesRequest(page_size=2), metadata=tenant("acme"))
    assert [b.batch_id for b in page.batches] == ids[::-1][:2] and page.next_page_token
    rest = await stub.ListBatches(
        S.ListBatchesRequest(page_size=2, page_token=page.next_page_token),
        metadata=tenant("acme"),
    )
    assert [b.batch_id for b in rest.batches] == ids[:1] and not rest.next_page_token
    done = await stub.ListBatches(
        S.ListBatchesRequest(state=S.BATCH_STATE_COMPLETED), metadata=tenant("acme")
    )
    assert len(done.batches) == 3
    queued = await stub.ListBatches(
        S.ListBatchesRequest(state=S.BATCH_STATE_QUEUED), metadata=tenant("acme")
    )
    assert list(queued.batches) == []

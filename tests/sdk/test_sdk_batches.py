"""Batches through the SDK: submit from an iterable or a JSONL file, wait with progress,
iterate the results (resumable), cancel. Both backends, the reference services answering."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aorkestra import AsyncClient, BatchProgress, RetryNotice, RetryPolicy, read_jsonl
from aorkestra._proto.orchestrator.v1 import batch_pb2
from domain.identity import Role
from tests.sdk.conftest import Platform, start_platform
from tests.support.keys import api_key_for
from tests.support.tcp_proxy import DroppingProxy


@pytest.fixture
async def batch_platform(backend_url: str | None) -> AsyncIterator[Platform]:
    async with start_platform(backend_url, batch_worker_enabled=True) as started:
        yield started


@pytest.fixture
async def sdk(batch_platform: Platform) -> AsyncIterator[AsyncClient]:
    async with batch_platform.client() as client:
        yield client


ITEMS = [
    {"custom_id": f"item-{n}", "kind": "llm_query", "content": f"question {n}"} for n in range(5)
]


async def test_a_batch_from_an_iterable_is_waited_for_with_progress_and_its_results_read(
    sdk: AsyncClient,
) -> None:
    batch = await sdk.batches.submit(iter(ITEMS))
    seen: list[BatchProgress] = []
    final = await sdk.batches.wait(batch.batch_id, progress=seen.append, poll_s=0.05)
    assert final.state == batch_pb2.BATCH_STATE_COMPLETED
    assert seen[-1].done == seen[-1].total == len(ITEMS)
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    results = [r async for r in sdk.batches.results(batch.batch_id)]
    assert sorted(r.custom_id for r in results) == sorted(i["custom_id"] for i in ITEMS)
    assert all(r.state == batch_pb2.BATCH_ITEM_STATE_COMPLETED for r in results)


async def test_results_resume_after_a_sequence_without_repeating(sdk: AsyncClient) -> None:
    batch = await sdk.batches.submit(ITEMS)
    await sdk.batches.wait(batch.batch_id, poll_s=0.05)
    everything = [r async for r in sdk.batches.results(batch.batch_id)]
    rest = [r async for r in sdk.batches.results(batch.batch_id, after=everything[1].sequence)]
    assert [r.sequence for r in rest] == [r.sequence for r in everything[2:]]


async def test_a_batch_is_submitted_from_a_jsonl_file(sdk: AsyncClient, tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps(item) for item in ITEMS) + "\n\n")
    batch = await sdk.batches.submit_jsonl(path)
    assert batch.counts.total == len(ITEMS)
    final = await sdk.batches.wait(batch.batch_id, poll_s=0.05)
    assert final.counts.completed == len(ITEMS)


def test_a_bad_jsonl_line_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"custom_id": "a", "content": "x"}\n{"custom_id": "b", "colour": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: unknown batch item fields: colour"):
        read_jsonl(path)


async def test_a_submit_repeated_with_its_idempotency_key_returns_the_same_batch(
    sdk: AsyncClient,
) -> None:
    first = await sdk.batches.submit(ITEMS, idempotency_key="once")
    again = await sdk.batches.submit(ITEMS, idempotency_key="once")
    assert again.batch_id == first.batch_id


async def test_a_cancelled_batch_ends_cancelled(backend_url: str | None) -> None:
    async with start_platform(backend_url, batch_worker_enabled=True, step_delay_s=0.3) as slow:
        async with slow.client() as client:
            many = [{"custom_id": f"c{n}", "content": "slow"} for n in range(20)]
            batch = await client.batches.submit(many, priority="low")
            await client.batches.cancel(batch.batch_id)
            final = await client.batches.wait(batch.batch_id, poll_s=0.05)
        assert final.state == batch_pb2.BATCH_STATE_CANCELLED
        assert final.counts.cancelled > 0


async def test_results_continue_after_a_dropped_connection_without_loss_or_duplicate(
    backend_url: str | None,
) -> None:
    # One item at a time, so that results are still to come when the connection drops (with
    # every item running at once, all results could already sit in the client's buffer).
    async with start_platform(
        backend_url, batch_worker_enabled=True, batch_worker_concurrency=1, step_delay_s=0.1
    ) as slow:
        proxy = DroppingProxy(slow.address)
        address = await proxy.start()
        notices: list[RetryNotice] = []
        try:
            async with AsyncClient(
                address,
                api_key=api_key_for("acme", Role.CLIENT),
                retry=RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.2),
                on_retry=notices.append,
            ) as sdk:
                batch = await sdk.batches.submit(ITEMS)
                read: list[batch_pb2.BatchItemResult] = []
                async for result in sdk.batches.results(batch.batch_id):
                    read.append(result)
                    if len(read) == 2:
                        proxy.drop_all()
        finally:
            await proxy.stop()
        async with slow.client() as direct:
            everything = [r async for r in direct.batches.results(batch.batch_id)]
    assert [r.sequence for r in read] == [r.sequence for r in everything]
    assert len(everything) == len(ITEMS)
    assert any(n.method == "StreamBatchResults" for n in notices)

"""Driving batches from tests: requests, a notice driver that answers every job the recording
dispatcher receives, and result stream readers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from domain.dispatch import WorkRequest
from domain.models import Service
from orchestrator.v1 import batch_pb2, batch_pb2_grpc, common_pb2, task_update_pb2
from orchestrator.v1 import task_update_pb2_grpc as tu_grpc
from tests.support.flow import EOF, TIMEOUT_S, Flow, completed, notice
from tests.support.servers import service, tenant

if TYPE_CHECKING:
    from orchestrator.v1.batch_pb2_grpc import BatchServiceAsyncStub

Result = batch_pb2.BatchItemResult


def batches(flow: Flow) -> BatchServiceAsyncStub:
    return batch_pb2_grpc.BatchServiceStub(flow.channel)


def llm_item(custom_id: str, content: str = "hello") -> batch_pb2.BatchItem:
    return batch_pb2.BatchItem(
        custom_id=custom_id, kind=batch_pb2.BATCH_ITEM_KIND_LLM_QUERY, content=content
    )


async def submit(
    flow: Flow, items: list[batch_pb2.BatchItem], tenant_id: str = "acme", **fields: Any
) -> batch_pb2.Batch:
    reply = await batches(flow).SubmitBatch(
        batch_pb2.SubmitBatchRequest(items=items, **fields),
        metadata=tenant(tenant_id),
        timeout=TIMEOUT_S,
    )
    batch: batch_pb2.Batch = reply.batch
    return batch


async def get_batch(flow: Flow, batch_id: str, tenant_id: str = "acme") -> batch_pb2.Batch:
    reply = await batches(flow).GetBatch(
        batch_pb2.GetBatchRequest(batch_id=batch_id), metadata=tenant(tenant_id)
    )
    batch: batch_pb2.Batch = reply.batch
    return batch


def stream(flow: Flow, batch_id: str, after: int = 0, tenant_id: str = "acme") -> Any:
    return batches(flow).StreamBatchResults(
        batch_pb2.StreamBatchResultsRequest(batch_id=batch_id, after_sequence=after),
        metadata=tenant(tenant_id),
        timeout=60.0,
    )


async def read_results(
    call: Any, count: int | None = None, timeout_s: float = 30.0
) -> list[Result]:
    """``count`` results of a StreamBatchResults call, or all of them up to its end."""

    async def collect() -> list[Result]:
        results: list[Result] = []
        while count is None or len(results) < count:
            message = await call.read()
            if message is EOF:
                assert count is None, f"stream ended after {len(results)} results"
                break
            results.append(message.result)
        return results

    return await asyncio.wait_for(collect(), timeout_s)


def completes_unless_fail(work: WorkRequest) -> str:
    """Default verdict: content starting with "fail" fails, anything else completes."""
    return "failed" if work.content.startswith("fail") else "completed"


@dataclass
class NoticeDriver:
    """Plays the downstream services: answers each job the dispatcher receives with a final
    notice on one PublishUpdates stream. ``verdict(work)`` says completed, failed or hold (no
    answer: the job stays running)."""

    flow: Flow
    verdict: Callable[[WorkRequest], str] = completes_unless_fail
    held: list[WorkRequest] = field(default_factory=list)
    _held_changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _out: asyncio.Queue[task_update_pb2.PublishUpdatesRequest | None] = field(
        default_factory=asyncio.Queue
    )

    async def _notices(self) -> AsyncIterator[task_update_pb2.PublishUpdatesRequest]:
        while (item := await self._out.get()) is not None:
            yield item

    async def _answer(self) -> None:
        while True:
            work = await self.flow.dispatcher.wait_submit()
            verdict = self.verdict(work)
            service_pb = (
                common_pb2.SERVICE_EMBEDDING
                if work.service is Service.EMBEDDING
                else common_pb2.SERVICE_QUERY
            )
            kw: dict[str, Any] = {"tenant_id": work.tenant_id, "service_pb": service_pb}
            if verdict == "completed":
                self._out.put_nowait(completed(work.job_id, 1, f"re: {work.content}", **kw))
            elif verdict == "failed":
                error = common_pb2.JobError(code="model_error", message="boom")
                self._out.put_nowait(notice(work.job_id, 1, "failed", error=error, **kw))
            else:
                async with self._held_changed:
                    self.held.append(work)
                    self._held_changed.notify_all()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[NoticeDriver]:
        stub = tu_grpc.TaskUpdateServiceStub(self.flow.channel)
        publish = asyncio.ensure_future(
            stub.PublishUpdates(self._notices(), metadata=service(), timeout=120.0)
        )
        answer = asyncio.create_task(self._answer())
        try:
            yield self
        finally:
            answer.cancel()
            self._out.put_nowait(None)
            await asyncio.gather(answer, publish, return_exceptions=True)

    async def wait_held(self, count: int, timeout_s: float = TIMEOUT_S) -> None:
        async def wait() -> None:
            async with self._held_changed:
                await self._held_changed.wait_for(lambda: len(self.held) >= count)

        await asyncio.wait_for(wait(), timeout_s)

"""orchestrator.v1.BatchService."""

from __future__ import annotations

from collections.abc import AsyncIterator

from domain.batches import BatchManager
from handlers.batch_converters import (
    batch_state_from_pb,
    batch_to_pb,
    result_to_pb,
    submission_from_pb,
)
from handlers.call_context import Ctx, call_context
from handlers.errors import stream_errors, unary_errors
from handlers.request_context import current_caller
from orchestrator.v1 import batch_pb2, batch_pb2_grpc


class BatchServicer(batch_pb2_grpc.BatchServiceServicer):
    """Thin adapter over domain.batches.BatchManager."""

    def __init__(self, batches: BatchManager) -> None:
        self._batches = batches

    @unary_errors
    async def SubmitBatch(
        self, request: batch_pb2.SubmitBatchRequest, context: Ctx
    ) -> batch_pb2.SubmitBatchResponse:
        batch = await self._batches.submit(call_context(context), submission_from_pb(request))
        return batch_pb2.SubmitBatchResponse(batch=batch_to_pb(batch))

    @unary_errors
    async def GetBatch(
        self, request: batch_pb2.GetBatchRequest, context: Ctx
    ) -> batch_pb2.GetBatchResponse:
        batch = await self._batches.get(current_caller().tenant_id, request.batch_id)
        return batch_pb2.GetBatchResponse(batch=batch_to_pb(batch))

    @unary_errors
    async def ListBatches(
        self, request: batch_pb2.ListBatchesRequest, context: Ctx
    ) -> batch_pb2.ListBatchesResponse:
        page = await self._batches.list(
            current_caller().tenant_id,
            page_size=request.page_size,
            page_token=request.page_token,
            state=batch_state_from_pb(request.state),
        )
        return batch_pb2.ListBatchesResponse(
            batches=[batch_to_pb(b) for b in page.items], next_page_token=page.next_cursor or ""
        )

    @stream_errors
    async def StreamBatchResults(
        self, request: batch_pb2.StreamBatchResultsRequest, context: Ctx
    ) -> AsyncIterator[batch_pb2.StreamBatchResultsResponse]:
        results = self._batches.stream_results(
            current_caller().tenant_id, request.batch_id, request.after_sequence
        )
        async for result in results:
            yield batch_pb2.StreamBatchResultsResponse(result=result_to_pb(result))

    @unary_errors
    async def CancelBatch(
        self, request: batch_pb2.CancelBatchRequest, context: Ctx
    ) -> batch_pb2.CancelBatchResponse:
        batch = await self._batches.cancel(call_context(context), request.batch_id)
        return batch_pb2.CancelBatchResponse(batch=batch_to_pb(batch))

"""Protobuf <-> domain conversions of the batch service. Pure functions, no I/O."""

from __future__ import annotations

from domain.batch_models import Batch, BatchState, ItemKind, ItemResult, ItemState
from domain.batches import BatchSubmission, ItemInput
from domain.ports.queue import QueuePriority
from handlers.converters import enum_from_pb, optional_duration_ms, timestamp_from_ms, usage_to_pb
from handlers.event_converters import result_from_data, usage_from_data
from orchestrator.v1 import batch_pb2, common_pb2

_BATCH_STATE_TO_PB = {
    BatchState.VALIDATING: batch_pb2.BATCH_STATE_VALIDATING,
    BatchState.QUEUED: batch_pb2.BATCH_STATE_QUEUED,
    BatchState.IN_PROGRESS: batch_pb2.BATCH_STATE_IN_PROGRESS,
    BatchState.COMPLETED: batch_pb2.BATCH_STATE_COMPLETED,
    BatchState.FAILED: batch_pb2.BATCH_STATE_FAILED,
    BatchState.CANCELLING: batch_pb2.BATCH_STATE_CANCELLING,
    BatchState.CANCELLED: batch_pb2.BATCH_STATE_CANCELLED,
    BatchState.EXPIRED: batch_pb2.BATCH_STATE_EXPIRED,
}
_BATCH_STATE_FROM_PB = {v: k for k, v in _BATCH_STATE_TO_PB.items()}
_ITEM_STATE_TO_PB = {
    ItemState.QUEUED: batch_pb2.BATCH_ITEM_STATE_QUEUED,
    ItemState.RUNNING: batch_pb2.BATCH_ITEM_STATE_RUNNING,
    ItemState.COMPLETED: batch_pb2.BATCH_ITEM_STATE_COMPLETED,
    ItemState.FAILED: batch_pb2.BATCH_ITEM_STATE_FAILED,
    ItemState.CANCELLED: batch_pb2.BATCH_ITEM_STATE_CANCELLED,
    ItemState.EXPIRED: batch_pb2.BATCH_ITEM_STATE_EXPIRED,
}
_KIND_FROM_PB = {
    batch_pb2.BATCH_ITEM_KIND_CHAT_MESSAGE: ItemKind.CHAT_MESSAGE,
    batch_pb2.BATCH_ITEM_KIND_LLM_QUERY: ItemKind.LLM_QUERY,
    batch_pb2.BATCH_ITEM_KIND_RAG_QUERY: ItemKind.RAG_QUERY,
    batch_pb2.BATCH_ITEM_KIND_EMBEDDING: ItemKind.EMBEDDING,
}
_PRIORITY_FROM_PB = {
    common_pb2.PRIORITY_UNSPECIFIED: QueuePriority.NORMAL,
    common_pb2.PRIORITY_HIGH: QueuePriority.HIGH,
    common_pb2.PRIORITY_NORMAL: QueuePriority.NORMAL,
    common_pb2.PRIORITY_LOW: QueuePriority.LOW,
}
_PRIORITY_TO_PB = {
    QueuePriority.HIGH: common_pb2.PRIORITY_HIGH,
    QueuePriority.NORMAL: common_pb2.PRIORITY_NORMAL,
    QueuePriority.LOW: common_pb2.PRIORITY_LOW,
}


def priority_from_pb(priority: common_pb2.Priority.ValueType) -> QueuePriority:
    return enum_from_pb(_PRIORITY_FROM_PB, priority, "priority", "priority")


def batch_state_from_pb(state: batch_pb2.BatchState.ValueType) -> BatchState | None:
    """A filter state: None for UNSPECIFIED; InvalidArgument for unknown numbers."""
    if state == batch_pb2.BATCH_STATE_UNSPECIFIED:
        return None
    return enum_from_pb(_BATCH_STATE_FROM_PB, state, "state", "batch state")


def submission_from_pb(request: batch_pb2.SubmitBatchRequest) -> BatchSubmission:
    return BatchSubmission(
        items=[
            ItemInput(
                custom_id=item.custom_id,
                kind=_KIND_FROM_PB.get(item.kind),
                content=item.content,
                session_id=item.session_id,
                model=item.model,
                collections=tuple(item.collections),
            )
            for item in request.items
        ],
        priority=priority_from_pb(request.priority),
        idempotency_key=request.idempotency_key,
        window_ms=optional_duration_ms(request, "completion_window", request.completion_window),
        metadata=dict(request.metadata),
    )


def batch_to_pb(batch: Batch) -> batch_pb2.Batch:
    c = batch.counts
    message = batch_pb2.Batch(
        batch_id=batch.batch_id,
        state=_BATCH_STATE_TO_PB[batch.state],
        priority=_PRIORITY_TO_PB[batch.priority],
        counts=batch_pb2.BatchCounts(
            total=c.total,
            queued=c.queued,
            running=c.running,
            completed=c.completed,
            failed=c.failed,
            cancelled=c.cancelled,
            expired=c.expired,
        ),
        idempotency_key=batch.idempotency_key,
        metadata=dict(batch.metadata),
        create_time=timestamp_from_ms(batch.created_ms),
        update_time=timestamp_from_ms(batch.updated_ms),
        expire_time=timestamp_from_ms(batch.expire_ms),
    )
    if batch.finish_ms:
        message.finish_time.CopyFrom(timestamp_from_ms(batch.finish_ms))
    return message


def result_to_pb(result: ItemResult) -> batch_pb2.BatchItemResult:
    message = batch_pb2.BatchItemResult(
        batch_id=result.batch_id,
        custom_id=result.custom_id,
        sequence=result.sequence,
        state=_ITEM_STATE_TO_PB[result.state],
        finish_time=timestamp_from_ms(result.finish_ms),
        job_id=result.job_id,
    )
    data = result.data
    if result.state is ItemState.COMPLETED:
        message.result.CopyFrom(result_from_data(data.get("result") or {}))
        message.usage.CopyFrom(usage_to_pb(usage_from_data(data.get("usage"))))
    error = data.get("error")
    if error:
        message.error.CopyFrom(
            common_pb2.JobError(
                code=str(error.get("code", "")),
                message=str(error.get("message", "")),
                retryable=bool(error.get("retryable", False)),
            )
        )
    return message

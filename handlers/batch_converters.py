"""Protobuf <-> domain conversions of the batch service. Pure functions, no I/O."""

from __future__ import annotations

import dataclasses

from domain.batch_models import Batch, BatchState, ItemKind, ItemResult, ItemState
from domain.batches import BatchSubmission, ItemInput
from domain.ports.queue import QueuePriority
from handlers.converters import (
    enum_from_pb,
    enum_to_pb,
    inverse,
    optional_duration_ms,
    timestamp_from_ms,
    usage_to_pb,
)
from handlers.event_converters import error_from_data, result_from_data, usage_from_data
from orchestrator.v1 import batch_pb2, common_pb2

_BATCH_STATE_TO_PB = enum_to_pb(BatchState, batch_pb2.BatchState, "BATCH_STATE_")
_BATCH_STATE_FROM_PB = inverse(_BATCH_STATE_TO_PB)
_ITEM_STATE_TO_PB = enum_to_pb(ItemState, batch_pb2.BatchItemState, "BATCH_ITEM_STATE_")
_KIND_FROM_PB = inverse(enum_to_pb(ItemKind, batch_pb2.BatchItemKind, "BATCH_ITEM_KIND_"))
_PRIORITY_TO_PB = enum_to_pb(QueuePriority, common_pb2.Priority, "PRIORITY_")
_PRIORITY_FROM_PB = {
    common_pb2.PRIORITY_UNSPECIFIED: QueuePriority.NORMAL,
    **inverse(_PRIORITY_TO_PB),
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
    message = batch_pb2.Batch(
        batch_id=batch.batch_id,
        state=_BATCH_STATE_TO_PB[batch.state],
        priority=_PRIORITY_TO_PB[batch.priority],
        # The message's counters are named as the domain's.
        counts=batch_pb2.BatchCounts(**dataclasses.asdict(batch.counts)),
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
        message.error.CopyFrom(error_from_data(error, missing_code=""))
    return message

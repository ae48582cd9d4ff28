"""Batch domain objects: plain, immutable, storage-agnostic (rules live in domain.batches)."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from domain.models import WorkKind
from domain.ports.queue import QueuePriority


class BatchState(enum.StrEnum):
    """Lifecycle of a batch (orchestrator.v1.BatchState)."""

    VALIDATING = "validating"
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_final(self) -> bool:
        return self in _FINAL_BATCH_STATES


_FINAL_BATCH_STATES = frozenset(
    {BatchState.COMPLETED, BatchState.FAILED, BatchState.CANCELLED, BatchState.EXPIRED}
)


class ItemState(enum.StrEnum):
    """State of one batch item (orchestrator.v1.BatchItemState). The final states double as
    the names of the batch's count fields."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_final(self) -> bool:
        return self not in (ItemState.QUEUED, ItemState.RUNNING)


class ItemStart(enum.Enum):
    """What BatchStore.start_item did: REFUSED (the item must not run), STARTED (QUEUED ->
    RUNNING: no earlier delivery got this far, so no job runs it yet) or RESUMED (left RUNNING
    by an earlier delivery that did not finish: its job may exist). Truthy when it may run."""

    REFUSED = 0
    STARTED = 1
    RESUMED = 2

    def __bool__(self) -> bool:
        return self is not ItemStart.REFUSED


class ItemKind(enum.StrEnum):
    """What a batch item asks for (orchestrator.v1.BatchItemKind)."""

    CHAT_MESSAGE = "chat_message"
    LLM_QUERY = "llm_query"
    RAG_QUERY = "rag_query"
    EMBEDDING = "embedding"

    @property
    def work_kind(self) -> WorkKind:
        """The job kind: a chat message is an LLM query on its session."""
        if self is ItemKind.RAG_QUERY:
            return WorkKind.RAG_QUERY
        if self is ItemKind.EMBEDDING:
            return WorkKind.EMBEDDING
        return WorkKind.LLM_QUERY


@dataclass(frozen=True, slots=True)
class BatchItemSpec:
    """One validated item; ``index`` is its position in the request."""

    index: int
    custom_id: str
    kind: ItemKind
    content: str
    session_id: str = ""
    model: str = ""
    collections: Sequence[str] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class BatchCounts:
    total: int = 0
    queued: int = 0
    running: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    expired: int = 0

    @property
    def finished(self) -> int:
        return self.completed + self.failed + self.cancelled + self.expired


@dataclass(frozen=True, slots=True)
class NewBatch:
    """A validated batch about to be stored. ``session_id`` is the internal session that runs
    its items without a session of their own (empty when every item names one)."""

    batch_id: str
    priority: QueuePriority
    idempotency_key: str
    metadata: Mapping[str, str]
    window_ms: int
    custom_ids: Sequence[str]
    session_id: str = ""


@dataclass(frozen=True, slots=True)
class Batch:
    """A batch as stored. Times are Unix milliseconds; ``finish_ms`` is 0 until final."""

    batch_id: str
    tenant_id: str
    state: BatchState
    priority: QueuePriority
    counts: BatchCounts
    idempotency_key: str
    metadata: Mapping[str, str]
    created_ms: int
    updated_ms: int
    expire_ms: int
    finish_ms: int = 0
    session_id: str = ""


@dataclass(frozen=True, slots=True)
class ItemOutcome:
    """How a run of an item ended, as the runner reports it. ``result``, ``usage`` and
    ``error`` are plain JSON-compatible data (the shapes of SessionEvent.data)."""

    state: ItemState
    job_id: str = ""
    result: Mapping[str, Any] | None = None
    usage: Mapping[str, Any] | None = None
    error: Mapping[str, Any] | None = None

    def to_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.result is not None:
            data["result"] = dict(self.result)
        if self.usage is not None:
            data["usage"] = dict(self.usage)
        if self.error is not None:
            data["error"] = dict(self.error)
        return data


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One entry of a batch's result stream."""

    batch_id: str
    custom_id: str
    sequence: int
    state: ItemState
    job_id: str
    finish_ms: int
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RunningItem:
    """An item that was running when its batch was stopped: its job, if it had one yet."""

    index: int
    job_id: str
    session_id: str


def item_queue_id(batch_id: str, index: int) -> str:
    """The id of item ``index`` of the batch on the work queue."""
    return f"{batch_id}/{index}"


@dataclass(frozen=True, slots=True)
class ItemRef:
    """One item of one batch: what the several-items store calls take."""

    tenant_id: str
    batch_id: str
    index: int

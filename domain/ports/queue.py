"""The work queue interface: prioritised, tenant-fair, at-least-once delivery with leases,
exactly-once results, retries with backoff and a dead letter.

Two backends implement :class:`WorkQueue` alike (``registry.redis_queue`` on Redis Streams,
``registry.memory_queue`` in process memory); ``tests/registry/test_work_queue_contract.py``
runs one suite against both. The queue never looks inside a payload: it moves opaque bytes plus
the metadata needed to schedule them (tenant, kind, priority, ids).

Life of an item::

    enqueue -> queued -> (dequeue: leased to a consumer) -> running
        running --complete--> done (result kept for result_ttl)
        running --fail------> delayed (backoff) -> queued ...  or  dead (dead letter)
        running --lease expires--> reclaimed by another consumer's dequeue (delivery counted)
        running --release-------> queued (delivery not counted; graceful shutdown)
        dead --redrive--> queued (deliveries reset to 0)

A delivery is identified by its :class:`WorkItem` (``receipt`` + ``consumer``); every call about
a delivery passes the item back. Completion is a compare-and-set on the item's record, so when
an item is delivered twice (a lease expired while its first consumer was merely slow) only the
first result is stored and the second call reports ``False``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class QueuePriority(enum.StrEnum):
    """Fixed priority levels; every ready HIGH item is served before any NORMAL one, and so on."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


# Highest first: the order in which dequeue looks at the levels.
PRIORITY_ORDER: tuple[QueuePriority, ...] = (
    QueuePriority.HIGH,
    QueuePriority.NORMAL,
    QueuePriority.LOW,
)


class ResultStatus(enum.StrEnum):
    """How an item ended: its handler returned a value, or it was dead-lettered."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"


class FailOutcome(enum.StrEnum):
    """What :meth:`WorkQueue.fail` did with the item."""

    RETRY_SCHEDULED = "retry_scheduled"
    DEAD_LETTERED = "dead_lettered"
    # The item had already finished (or the delivery no longer holds it): nothing changed.
    IGNORED = "ignored"


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """Per-queue policy shared by every producer and consumer of the queue."""

    max_deliveries: int = 5  # deliveries (including lease expiries) before the dead letter
    retry_base_ms: int = 500  # first retry delay; doubles per delivery
    retry_cap_ms: int = 60_000  # largest retry delay
    result_ttl_ms: int = 3_600_000  # how long a finished item's result stays readable

    def retry_delay_ms(self, deliveries: int) -> int:
        """Exponential backoff after the ``deliveries``-th delivery failed (1-based)."""
        return int(min(self.retry_cap_ms, self.retry_base_ms * 2 ** max(deliveries - 1, 0)))


@dataclass(frozen=True, slots=True)
class NewWorkItem:
    """What a producer enqueues. ``item_id`` is the idempotency key: enqueueing an id that the
    queue already knows (queued, running, finished or dead) changes nothing."""

    item_id: str
    tenant_id: str
    kind: str
    payload: bytes
    priority: QueuePriority = QueuePriority.NORMAL
    batch_id: str | None = None


@dataclass(frozen=True, slots=True)
class QueuedItem:
    """An item as the queue keeps it (what was enqueued) and how often it was delivered."""

    item_id: str
    tenant_id: str
    kind: str
    payload: bytes
    priority: QueuePriority
    batch_id: str | None
    deliveries: int


@dataclass(frozen=True, slots=True)
class WorkItem(QueuedItem):
    """One delivery of an item to a consumer. ``deliveries`` counts this one (1 on the first).
    ``receipt`` identifies the delivery to the backend; callers treat it as opaque."""

    enqueued_at_ms: int
    consumer: str
    receipt: str


@dataclass(frozen=True, slots=True)
class WorkResult:
    """The final outcome of an item: ``value`` when it succeeded, ``error`` when it was
    dead-lettered."""

    item_id: str
    status: ResultStatus
    value: bytes | None
    error: str | None
    deliveries: int
    finished_at_ms: int


@dataclass(frozen=True, slots=True)
class DeadLetter(QueuedItem):
    """An item in the dead letter, with the last error and how often it was delivered."""

    error: str
    dead_at_ms: int
    position: str  # opaque place in the dead letter: pass as ``after`` to list the next page


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Counts for monitoring and tests: ready (waiting for a consumer), leased (delivered and
    not yet completed, failed or released), delayed (waiting for a retry) and dead."""

    ready: int
    leased: int
    delayed: int
    dead: int


@dataclass(frozen=True, slots=True)
class PriorityDepth:
    """How many items of one priority level are where (of one tenant, or of all)."""

    priority: QueuePriority
    ready: int
    leased: int
    delayed: int
    dead: int


class WorkQueue(Protocol):
    """A priority work queue shared by producers and workers."""

    async def enqueue(self, items: Sequence[NewWorkItem]) -> int:
        """Queue items atomically per call; returns how many were new (known ids are skipped)."""
        ...

    async def dequeue(
        self, consumer: str, *, count: int, lease_ms: int, wait_ms: int = 0
    ) -> list[WorkItem]:
        """Lease up to ``count`` items to ``consumer``: first items whose lease expired (another
        consumer died), then ready items, highest priority first and round-robin over tenants
        within a level. With ``wait_ms`` it waits that long for work when none is ready.

        Every consumer of one queue must use the same ``lease_ms``: an item is reclaimed when
        its delivery has not been renewed for ``lease_ms`` of the reclaiming consumer."""
        ...

    async def renew(self, items: Sequence[WorkItem]) -> list[bool]:
        """Restart each delivery's lease, all in one call (a worker renews every item it runs
        at once). Per item, in the caller's order: False when its delivery no longer holds it
        (reclaimed by another consumer, or finished)."""
        ...

    async def complete(self, results: Sequence[tuple[WorkItem, bytes]]) -> list[bool]:
        """Store each item's result unless the item already finished (compare-and-set), and
        acknowledge the delivery either way. True per item when this result was stored."""
        ...

    async def fail(self, item: WorkItem, error: str, *, retry: bool = True) -> FailOutcome:
        """Record a failed delivery: schedule a retry with exponential backoff, or dead-letter
        the item when ``retry`` is False or it has had ``max_deliveries`` deliveries."""
        ...

    async def release(self, item: WorkItem, *, delay_ms: int = 0) -> bool:
        """Give a delivery back unfinished (graceful shutdown, or the handler deferred it): the
        item is ready again at once (or ``delay_ms`` from now, waiting as a retry does) and this
        delivery does not count. False when the delivery no longer holds the item."""
        ...

    async def get_result(self, item_id: str) -> WorkResult | None:
        """The item's final outcome, or None while it is unfinished, unknown or expired."""
        ...

    async def wait_result(self, item_id: str, timeout_s: float) -> WorkResult | None:
        """Wait up to ``timeout_s`` for the item's final outcome; None on timeout."""
        ...

    async def list_dead(self, *, limit: int = 100, after: str | None = None) -> list[DeadLetter]:
        """Dead-lettered items, oldest first, strictly after ``after`` (a ``position``)."""
        ...

    async def redrive(self, item_id: str) -> bool:
        """Put a dead-lettered item back in its queue with its delivery count reset; False when
        the item is not in the dead letter."""
        ...

    async def stats(self) -> QueueStats:
        """Current counts."""
        ...

    async def get_dead(self, item_id: str) -> DeadLetter | None:
        """The item with its payload while it is in the dead letter, else None."""
        ...

    async def depth(self, tenant_id: str | None = None) -> list[PriorityDepth]:
        """Items by priority level and place (ready, leased, delayed, dead), of ``tenant_id``
        or of every tenant: one entry per level, highest first, zeros included."""
        ...

    async def aclose(self) -> None:
        """Stop background listeners and wake every waiter."""
        ...

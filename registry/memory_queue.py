"""The work queue in process memory: the embedded default when no Redis is configured.

Single process only. It mirrors the Redis design (registry.redis_queue) so both pass one contract
suite: a FIFO per (priority, tenant) plays the stream, a per-level rotation of tenants with ready
work gives fairness, a dict of leases plays the pending entries list (a lease expires when it has
not been renewed for ``lease_ms``), a heap holds delayed retries and an ordered dict the dead
letter. Nothing blocks: waiters sleep on asyncio events that enqueue and completion set.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from domain.ports import queue
from registry.memory_sessions import wall_clock_ms


def monotonic_ms() -> float:
    return time.monotonic() * 1000.0


@dataclass(slots=True)
class _Record:
    """Everything the queue knows about one item (the Redis backend's item hash)."""

    new: queue.NewWorkItem
    enqueued_at_ms: int
    state: str = "queued"  # queued | running | delayed | done | dead
    deliveries: int = 0
    entry: str = ""  # the current delivery's receipt; older receipts are stale
    error: str | None = None
    value: bytes | None = None
    finished_at_ms: int = 0
    expires_at: float | None = None  # monotonic ms; set when done (result TTL)
    dead_position: int = 0

    @property
    def final(self) -> bool:
        return self.state in ("done", "dead")

    def enqueued_fields(self) -> dict[str, Any]:
        """What a delivered or dead-lettered item repeats of its enqueue (all but the payload's
        fate): every field of ``new``, and the deliveries so far."""
        new = self.new
        return {
            **{f.name: getattr(new, f.name) for f in fields(new)},
            "deliveries": self.deliveries,
        }


@dataclass(slots=True)
class _Lease:
    item_id: str
    consumer: str
    renewed_at: float  # monotonic ms


@dataclass(slots=True)
class _Waiters:
    """Futures waiting for one item's result."""

    futures: list[asyncio.Future[None]] = field(default_factory=list)


class MemoryWorkQueue:
    """domain.ports.queue.WorkQueue in process memory."""

    def __init__(
        self,
        config: queue.QueueConfig | None = None,
        *,
        clock: Callable[[], float] = monotonic_ms,
        wall_clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self._config = config or queue.QueueConfig()
        self._clock = clock
        self._wall = wall_clock
        self._records: dict[str, _Record] = {}
        self._ready: dict[tuple[queue.QueuePriority, str], deque[tuple[str, str]]] = {}
        self._rotation: dict[queue.QueuePriority, deque[str]] = {
            p: deque() for p in queue.PRIORITY_ORDER
        }
        self._leases: dict[str, _Lease] = {}  # receipt -> lease, oldest first
        self._delayed: list[tuple[float, int, str]] = []  # (due, seq, item_id) heap
        self._dead: dict[int, str] = {}  # position -> item id, oldest first
        self._seq = itertools.count(1)
        self._work_ready = asyncio.Event()
        self._waiters: dict[str, _Waiters] = {}
        self._closed = False

    async def enqueue(self, items: Sequence[queue.NewWorkItem]) -> int:
        added = 0
        for new in items:
            if self._live_record(new.item_id) is not None:
                continue
            record = _Record(new=new, enqueued_at_ms=self._wall())
            self._records[new.item_id] = record
            self._push_ready(record)
            added += 1
        return added

    async def dequeue(
        self, consumer: str, *, count: int, lease_ms: int, wait_ms: int = 0
    ) -> list[queue.WorkItem]:
        deadline = self._clock() + wait_ms
        while True:
            items = self._take(consumer, count, lease_ms)
            remaining = deadline - self._clock()
            if items or remaining <= 0 or self._closed:
                return items
            self._work_ready.clear()
            # Wake for new work, or when the next retry falls due or the oldest lease expires.
            wake = remaining
            if self._delayed:
                wake = min(wake, self._delayed[0][0] - self._clock())
            if self._leases:
                oldest = next(iter(self._leases.values())).renewed_at + lease_ms
                wake = min(wake, oldest - self._clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._work_ready.wait(), max(wake, 1.0) / 1000.0)

    async def renew(self, items: Sequence[queue.WorkItem]) -> list[bool]:
        now = self._clock()
        leases = self._leases
        held: list[bool] = []
        for item in items:
            lease = leases.get(item.receipt)
            if lease is None or lease.consumer != item.consumer:
                held.append(False)
                continue
            # Re-insert so the dict stays ordered by last renewal (oldest first).
            del leases[item.receipt]
            lease.renewed_at = now
            leases[item.receipt] = lease
            held.append(True)
        return held

    async def complete(self, results: Sequence[tuple[queue.WorkItem, bytes]]) -> list[bool]:
        stored: list[bool] = []
        for item, value in results:
            self._leases.pop(item.receipt, None)
            record = self._live_record(item.item_id)
            if record is None or record.final:
                stored.append(False)
                continue
            record.state = "done"
            record.value = value
            record.finished_at_ms = self._wall()
            record.expires_at = self._clock() + self._config.result_ttl_ms
            self._notify(item.item_id)
            stored.append(True)
        return stored

    async def fail(
        self, item: queue.WorkItem, error: str, *, retry: bool = True
    ) -> queue.FailOutcome:
        record = self._live_record(item.item_id)
        lease = self._leases.get(item.receipt)
        if record is None or record.final:
            self._leases.pop(item.receipt, None)
            return queue.FailOutcome.IGNORED
        if lease is None or lease.consumer != item.consumer:
            return queue.FailOutcome.IGNORED  # reclaimed by another consumer: its delivery decides
        del self._leases[item.receipt]
        record.error = error
        if not retry or record.deliveries >= self._config.max_deliveries:
            self._dead_letter(record)
            return queue.FailOutcome.DEAD_LETTERED
        record.state = "delayed"
        due = self._clock() + self._config.retry_delay_ms(record.deliveries)
        heapq.heappush(self._delayed, (due, next(self._seq), item.item_id))
        return queue.FailOutcome.RETRY_SCHEDULED

    async def release(self, item: queue.WorkItem, *, delay_ms: int = 0) -> bool:
        lease = self._leases.get(item.receipt)
        if lease is None or lease.consumer != item.consumer:
            return False
        del self._leases[item.receipt]
        record = self._live_record(item.item_id)
        if record is None or record.final:
            return False
        record.deliveries -= 1
        if delay_ms > 0:
            record.state = "delayed"
            heapq.heappush(self._delayed, (self._clock() + delay_ms, next(self._seq), item.item_id))
        else:
            self._push_ready(record)
        return True

    async def get_result(self, item_id: str) -> queue.WorkResult | None:
        record = self._live_record(item_id)
        if record is None or not record.final:
            return None
        return queue.WorkResult(
            item_id=item_id,
            status=queue.ResultStatus.SUCCEEDED
            if record.state == "done"
            else queue.ResultStatus.FAILED,
            value=record.value if record.state == "done" else None,
            error=record.error if record.state == "dead" else None,
            deliveries=record.deliveries,
            finished_at_ms=record.finished_at_ms,
        )

    async def wait_result(self, item_id: str, timeout_s: float) -> queue.WorkResult | None:
        result = await self.get_result(item_id)
        if result is not None or timeout_s <= 0 or self._closed:
            return result
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(item_id, _Waiters())
        waiters.futures.append(future)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(future, timeout_s)
        finally:
            if future in waiters.futures:
                waiters.futures.remove(future)
            if not waiters.futures:
                self._waiters.pop(item_id, None)
        return await self.get_result(item_id)

    async def list_dead(
        self, *, limit: int = 100, after: str | None = None
    ) -> list[queue.DeadLetter]:
        start = int(after) if after else 0
        found: list[queue.DeadLetter] = []
        for position, item_id in self._dead.items():
            if position <= start:
                continue
            found.append(self._dead_letter_of(self._records[item_id]))
            if len(found) == limit:
                break
        return found

    async def redrive(self, item_id: str) -> bool:
        record = self._records.get(item_id)
        if record is None or record.state != "dead":
            return False
        del self._dead[record.dead_position]
        record.deliveries = 0
        record.error = None
        record.finished_at_ms = 0
        self._push_ready(record)
        return True

    async def stats(self) -> queue.QueueStats:
        self._promote_due()
        ready = sum(
            1
            for entries in self._ready.values()
            for item_id, entry in entries
            if (r := self._records.get(item_id)) is not None and r.entry == entry
        )
        return queue.QueueStats(
            ready=ready, leased=len(self._leases), delayed=len(self._delayed), dead=len(self._dead)
        )

    async def get_dead(self, item_id: str) -> queue.DeadLetter | None:
        record = self._records.get(item_id)
        if record is None or record.state != "dead":
            return None
        return self._dead_letter_of(record)

    async def depth(self, tenant_id: str | None = None) -> list[queue.PriorityDepth]:
        self._promote_due()
        counts = {
            p: dict.fromkeys(("queued", "running", "delayed", "dead"), 0)
            for p in queue.PRIORITY_ORDER
        }
        for item_id in list(self._records):
            record = self._live_record(item_id)
            if record is None or record.state == "done":
                continue
            if tenant_id is None or record.new.tenant_id == tenant_id:
                counts[record.new.priority][record.state] += 1
        return [
            queue.PriorityDepth(
                priority, found["queued"], found["running"], found["delayed"], found["dead"]
            )
            for priority, found in counts.items()
        ]

    async def aclose(self) -> None:
        self._closed = True
        self._work_ready.set()
        for waiters in list(self._waiters.values()):
            for future in waiters.futures:
                if not future.done():
                    future.set_result(None)

    # Internals ---------------------------------------------------------------------------

    def _live_record(self, item_id: str) -> _Record | None:
        """The record, forgetting it once its result TTL has passed."""
        record = self._records.get(item_id)
        expires_at = record.expires_at if record is not None else None
        if expires_at is not None and self._clock() >= expires_at:
            del self._records[item_id]
            return None
        return record

    def _push_ready(self, record: _Record) -> None:
        """Append a fresh entry for the item to its (priority, tenant) FIFO."""
        new = record.new
        record.state = "queued"
        record.entry = str(next(self._seq))
        key = (new.priority, new.tenant_id)
        fifo = self._ready.get(key)
        if fifo is None:
            fifo = self._ready[key] = deque()
        if not fifo:
            rotation = self._rotation[new.priority]
            if new.tenant_id not in rotation:
                rotation.append(new.tenant_id)
        fifo.append((new.item_id, record.entry))
        self._work_ready.set()

    def _promote_due(self) -> None:
        now = self._clock()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, item_id = heapq.heappop(self._delayed)
            record = self._live_record(item_id)
            if record is not None and record.state == "delayed":
                self._push_ready(record)

    def _take(self, consumer: str, count: int, lease_ms: int) -> list[queue.WorkItem]:
        self._promote_due()
        out: list[queue.WorkItem] = []
        now = self._clock()
        # 1. Leases not renewed for lease_ms: their consumer is presumed dead.
        expired: list[tuple[str, _Lease]] = []
        for receipt, lease in self._leases.items():  # oldest renewal first: stop at a live one
            if len(expired) >= count or lease.renewed_at + lease_ms > now:
                break
            expired.append((receipt, lease))
        for receipt, lease in expired:
            del self._leases[receipt]
            item = self._deliver(lease.item_id, receipt, consumer, reclaimed=True)
            if item is not None:
                out.append(item)
        # 2. Ready items: levels in order, one item per tenant per turn.
        for priority in queue.PRIORITY_ORDER:
            rotation = self._rotation[priority]
            while len(out) < count and rotation:
                tenant = rotation.popleft()
                fifo = self._ready.get((priority, tenant))
                if not fifo:
                    self._ready.pop((priority, tenant), None)
                    continue
                item_id, receipt = fifo.popleft()
                if fifo:
                    rotation.append(tenant)
                else:
                    del self._ready[(priority, tenant)]
                item = self._deliver(item_id, receipt, consumer, reclaimed=False)
                if item is not None:
                    out.append(item)
        return out

    def _deliver(
        self, item_id: str, receipt: str, consumer: str, *, reclaimed: bool
    ) -> queue.WorkItem | None:
        """Lease one entry to ``consumer``; None for stale entries and exhausted items."""
        record = self._live_record(item_id)
        if record is None or record.final or record.entry != receipt:
            return None
        record.deliveries += 1
        if reclaimed and record.deliveries > self._config.max_deliveries:
            record.error = record.error or "lease expired on every delivery"
            record.deliveries -= 1
            self._dead_letter(record)
            return None
        record.state = "running"
        self._leases[receipt] = _Lease(item_id, consumer, self._clock())
        return queue.WorkItem(
            **record.enqueued_fields(),
            enqueued_at_ms=record.enqueued_at_ms,
            consumer=consumer,
            receipt=receipt,
        )

    @staticmethod
    def _dead_letter_of(record: _Record) -> queue.DeadLetter:
        return queue.DeadLetter(
            **record.enqueued_fields(),
            error=record.error or "",
            dead_at_ms=record.finished_at_ms,
            position=str(record.dead_position),
        )

    def _dead_letter(self, record: _Record) -> None:
        record.state = "dead"
        record.finished_at_ms = self._wall()
        record.dead_position = next(self._seq)
        self._dead[record.dead_position] = record.new.item_id
        self._notify(record.new.item_id)

    def _notify(self, item_id: str) -> None:
        waiters = self._waiters.pop(item_id, None)
        if waiters is not None:
            for future in waiters.futures:
                if not future.done():
                    future.set_result(None)

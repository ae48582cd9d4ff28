"""Batches in process memory: the single-process twin of registry.redis_batches."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from domain.batch_models import (
    Batch,
    BatchCounts,
    BatchState,
    ItemOutcome,
    ItemRef,
    ItemResult,
    ItemStart,
    ItemState,
    NewBatch,
    RunningItem,
)
from domain.models import Page
from registry.memory_sessions import wall_clock_ms

_COUNT_FIELDS = ("queued", "running", "completed", "failed", "cancelled", "expired")


@dataclass
class _Record:
    batch: Batch
    custom_ids: list[str]
    states: list[ItemState]
    jobs: dict[int, tuple[str, str]] = field(default_factory=dict)
    results: list[ItemResult] = field(default_factory=list)  # in sequence order
    sequence: int = 0  # the last result's (a re-opened item's result leaves ``results``)
    appended: asyncio.Event = field(default_factory=asyncio.Event)


class MemoryBatchStore:
    """Implements domain.ports.batches.BatchStore over dicts (one event loop)."""

    def __init__(self, *, retention_ms: int = 7 * 24 * 3600 * 1000) -> None:
        self._batches: dict[tuple[str, str], _Record] = {}
        self._idempotency: dict[tuple[str, str], str] = {}
        self._retention_ms = retention_ms
        self._swept_ms = 0

    def _drop_retired(self) -> None:
        """Forget batches final for longer than the retention, with their idempotency keys
        (a scan, so at most every 100 ms)."""
        now = wall_clock_ms()
        if now - self._swept_ms < 100:
            return
        self._swept_ms = now
        retired = [
            key
            for key, record in self._batches.items()
            if record.batch.finish_ms and now >= record.batch.finish_ms + self._retention_ms
        ]
        for tenant_id, batch_id in retired:
            batch = self._batches.pop((tenant_id, batch_id)).batch
            if batch.idempotency_key:
                self._idempotency.pop((tenant_id, batch.idempotency_key), None)

    async def create_batch(self, tenant_id: str, new: NewBatch) -> tuple[Batch, bool]:
        self._drop_retired()
        if new.idempotency_key:
            existing = self._idempotency.get((tenant_id, new.idempotency_key))
            if existing is not None:
                return self._batches[(tenant_id, existing)].batch, False
            self._idempotency[(tenant_id, new.idempotency_key)] = new.batch_id
        now = wall_clock_ms()
        total = len(new.custom_ids)
        batch = Batch(
            batch_id=new.batch_id,
            tenant_id=tenant_id,
            state=BatchState.QUEUED,
            priority=new.priority,
            counts=BatchCounts(total=total, queued=total),
            idempotency_key=new.idempotency_key,
            metadata=dict(new.metadata),
            created_ms=now,
            updated_ms=now,
            expire_ms=now + new.window_ms,
            session_id=new.session_id,
        )
        self._batches[(tenant_id, new.batch_id)] = _Record(
            batch, list(new.custom_ids), [ItemState.QUEUED] * total
        )
        return batch, True

    async def find_by_idempotency_key(self, tenant_id: str, key: str) -> Batch | None:
        batch_id = self._idempotency.get((tenant_id, key))
        return None if batch_id is None else await self.get_batch(tenant_id, batch_id)

    async def get_batch(self, tenant_id: str, batch_id: str) -> Batch | None:
        self._drop_retired()
        record = self._batches.get((tenant_id, batch_id))
        return None if record is None else record.batch

    async def list_batches(
        self, tenant_id: str, *, limit: int, after: str | None, state: BatchState | None
    ) -> Page[Batch]:
        self._drop_retired()
        ids = sorted((b for t, b in self._batches if t == tenant_id), reverse=True)
        if after is not None:
            ids = [b for b in ids if b < after]
        found: list[Batch] = []
        for position, batch_id in enumerate(ids):
            batch = self._batches[(tenant_id, batch_id)].batch
            if state is None or batch.state is state:
                found.append(batch)
            if len(found) == limit:
                more = position + 1 < len(ids)
                return Page(found, batch_id if more else None)
        return Page(found, None)

    async def start_item(
        self, tenant_id: str, batch_id: str, index: int, *, redelivery: bool
    ) -> ItemStart:
        record = self._batches.get((tenant_id, batch_id))
        if record is None or not 0 <= index < len(record.states):
            return ItemStart.REFUSED
        batch = record.batch
        if batch.state not in (BatchState.QUEUED, BatchState.IN_PROGRESS):
            return ItemStart.REFUSED
        if wall_clock_ms() >= batch.expire_ms:
            return ItemStart.REFUSED
        current = record.states[index]
        if current is ItemState.RUNNING and redelivery:
            return ItemStart.RESUMED
        if current is not ItemState.QUEUED:
            return ItemStart.REFUSED
        record.states[index] = ItemState.RUNNING
        counts = replace(batch.counts, queued=batch.counts.queued - 1)
        counts = replace(counts, running=counts.running + 1)
        record.batch = replace(
            batch, state=BatchState.IN_PROGRESS, counts=counts, updated_ms=wall_clock_ms()
        )
        return ItemStart.STARTED

    async def attach_job(
        self, tenant_id: str, batch_id: str, index: int, job_id: str, session_id: str
    ) -> bool:
        record = self._batches.get((tenant_id, batch_id))
        if record is None or record.states[index] is not ItemState.RUNNING:
            return False
        record.jobs[index] = (job_id, session_id)
        return record.batch.state is not BatchState.CANCELLING

    async def finish_item(
        self, tenant_id: str, batch_id: str, index: int, outcome: ItemOutcome
    ) -> int | None:
        record = self._batches.get((tenant_id, batch_id))
        if record is None or record.states[index].is_final:
            return None
        result = self._finish(record, index, outcome.state, outcome.job_id, outcome.to_data())
        self._maybe_complete(record)
        return result.sequence

    def _finish(
        self, record: _Record, index: int, state: ItemState, job_id: str, data: dict[str, Any]
    ) -> ItemResult:
        previous = record.states[index]
        record.states[index] = state
        counts: dict[str, int] = {
            name: getattr(record.batch.counts, name) for name in _COUNT_FIELDS
        }
        counts[previous.value] -= 1
        counts[state.value] += 1
        now = wall_clock_ms()
        record.batch = replace(
            record.batch,
            counts=BatchCounts(total=record.batch.counts.total, **counts),
            updated_ms=now,
        )
        result = ItemResult(
            batch_id=record.batch.batch_id,
            custom_id=record.custom_ids[index],
            sequence=record.sequence + 1,
            state=state,
            job_id=job_id or record.jobs.get(index, ("", ""))[0],
            finish_ms=now,
            data=data,
        )
        record.sequence = result.sequence
        record.results.append(result)
        record.appended.set()
        record.appended = asyncio.Event()
        return result

    def _maybe_complete(self, record: _Record) -> None:
        counts = record.batch.counts
        if counts.finished < counts.total:
            return
        final = (
            BatchState.CANCELLED
            if record.batch.state is BatchState.CANCELLING
            else BatchState.COMPLETED
        )
        record.batch = replace(record.batch, state=final, finish_ms=record.batch.updated_ms)

    async def start_items(self, items: Sequence[ItemRef]) -> list[ItemStart]:
        return [
            await self.start_item(i.tenant_id, i.batch_id, i.index, redelivery=True) for i in items
        ]

    async def attach_jobs(self, jobs: Sequence[tuple[ItemRef, str, str]]) -> list[bool]:
        return [
            await self.attach_job(i.tenant_id, i.batch_id, i.index, job_id, session_id)
            for i, job_id, session_id in jobs
        ]

    async def finish_items(self, items: Sequence[tuple[ItemRef, ItemOutcome]]) -> list[int | None]:
        return [
            await self.finish_item(i.tenant_id, i.batch_id, i.index, outcome)
            for i, outcome in items
        ]

    async def stop_batch(
        self, tenant_id: str, batch_id: str, state: BatchState, error: dict[str, object]
    ) -> tuple[Batch | None, list[RunningItem]]:
        record = self._batches.get((tenant_id, batch_id))
        if record is None:
            return None, []
        if record.batch.state.is_final:
            return record.batch, []
        expire = state is BatchState.EXPIRED
        item_state = ItemState.EXPIRED if expire else ItemState.CANCELLED
        running: list[RunningItem] = []
        for index, current in enumerate(record.states):
            if current is ItemState.RUNNING:
                job_id, session_id = record.jobs.get(index, ("", ""))
                running.append(RunningItem(index, job_id, session_id))
            if current is ItemState.QUEUED or (expire and current is ItemState.RUNNING):
                self._finish(record, index, item_state, "", {"error": dict(error)})
        now = wall_clock_ms()
        if expire:
            record.batch = replace(record.batch, state=BatchState.EXPIRED, finish_ms=now)
        elif record.batch.counts.running > 0:
            record.batch = replace(record.batch, state=BatchState.CANCELLING, updated_ms=now)
        else:
            record.batch = replace(record.batch, state=BatchState.CANCELLED, finish_ms=now)
        return record.batch, running

    async def reopen_item(
        self, tenant_id: str, batch_id: str, index: int
    ) -> tuple[BatchState | None, ItemState | None]:
        record = self._batches.get((tenant_id, batch_id))
        if record is None:
            return None, None
        batch = record.batch
        if not 0 <= index < len(record.states):
            return batch.state, None
        item = record.states[index]
        if (
            batch.state not in (BatchState.QUEUED, BatchState.IN_PROGRESS, BatchState.COMPLETED)
            or wall_clock_ms() >= batch.expire_ms
            or item not in (ItemState.FAILED, ItemState.RUNNING)
        ):
            return batch.state, item
        if item is ItemState.FAILED:
            # Its result is the newest with its custom id (an item has one result at a time).
            custom_id = record.custom_ids[index]
            for position in range(len(record.results) - 1, -1, -1):
                if record.results[position].custom_id == custom_id:
                    del record.results[position]
                    break
        record.states[index] = ItemState.QUEUED
        counts: dict[str, int] = {name: getattr(batch.counts, name) for name in _COUNT_FIELDS}
        counts[item.value] -= 1
        counts["queued"] += 1
        state = BatchState.IN_PROGRESS if batch.state is BatchState.COMPLETED else batch.state
        record.batch = replace(
            batch,
            state=state,
            counts=BatchCounts(total=batch.counts.total, **counts),
            updated_ms=wall_clock_ms(),
            finish_ms=0,
        )
        return state, ItemState.QUEUED

    async def read_results(
        self, tenant_id: str, batch_id: str, after: int, *, limit: int, wait_s: float
    ) -> list[ItemResult]:
        record = self._batches.get((tenant_id, batch_id))
        if record is None:
            return []
        if record.sequence <= after and wait_s > 0:
            try:
                await asyncio.wait_for(record.appended.wait(), wait_s)
            except TimeoutError:
                return []
        return [result for result in record.results if result.sequence > after][:limit]

    async def due_for_expiry(self, *, limit: int) -> list[tuple[str, str]]:
        now = wall_clock_ms()
        due = [
            key
            for key, record in self._batches.items()
            if not record.batch.state.is_final and record.batch.expire_ms <= now
        ]
        return due[:limit]

    async def forget_expiry(self, tenant_id: str, batch_id: str) -> None:
        return None

    async def scheduled_batches(self, *, limit: int) -> list[tuple[str, str]]:
        self._drop_retired()
        unfinished = [
            key for key, record in self._batches.items() if not record.batch.state.is_final
        ]
        return unfinished[:limit]

    async def running_items(self, tenant_id: str, batch_id: str) -> list[int]:
        record = self._batches.get((tenant_id, batch_id))
        if record is None:
            return []
        return [i for i, state in enumerate(record.states) if state is ItemState.RUNNING]

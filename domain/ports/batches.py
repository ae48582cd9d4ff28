"""The batch store interface. ``registry.redis_batches`` and ``registry.memory_batches``
implement it alike; tests/registry/test_batch_store_contract.py runs one suite over both.

Every method is scoped to one tenant: another tenant's batch reads as missing. Item state
changes are compare-and-set, so each item gets exactly one result (one entry in the batch's
result stream) whatever the number of deliveries, cancellations and expiries racing for it, and
the counts always add up to the total. An operator's redrive of a dead-lettered item may
re-open it (``reopen_item``): its failed result then leaves the stream and its next result is
appended with a new sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from domain.batch_models import (
    Batch,
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


class BatchStore(Protocol):
    async def create_batch(self, tenant_id: str, new: NewBatch) -> tuple[Batch, bool]:
        """Store a QUEUED batch with every item queued, expiring ``window_ms`` from now. When
        the tenant already used ``new.idempotency_key`` (non-empty), nothing is stored and the
        existing batch is returned; the flag says whether the batch was created."""
        ...

    async def find_by_idempotency_key(self, tenant_id: str, key: str) -> Batch | None:
        """The tenant's batch submitted with ``key``, or None."""
        ...

    async def get_batch(self, tenant_id: str, batch_id: str) -> Batch | None:
        """The batch, or None when missing or another tenant's."""
        ...

    async def list_batches(
        self, tenant_id: str, *, limit: int, after: str | None, state: BatchState | None
    ) -> Page[Batch]:
        """Up to ``limit`` batches, newest first, strictly older than the batch id ``after``."""
        ...

    async def start_item(
        self, tenant_id: str, batch_id: str, index: int, *, redelivery: bool
    ) -> ItemStart:
        """QUEUED -> RUNNING (batch QUEUED -> IN_PROGRESS): STARTED. REFUSED when the item
        must not run: it is final, the batch is stopping or past its expiry. With
        ``redelivery`` an item left RUNNING by a consumer that died may run again: RESUMED."""
        ...

    async def attach_job(
        self, tenant_id: str, batch_id: str, index: int, job_id: str, session_id: str
    ) -> bool:
        """Record the job running the item; False when the batch is being cancelled (or the
        item is no longer running), so the caller should cancel the job."""
        ...

    async def finish_item(
        self, tenant_id: str, batch_id: str, index: int, outcome: ItemOutcome
    ) -> int | None:
        """Record an unfinished item's final state and append its result; returns the result's
        sequence, or None when the item had already finished. The batch becomes COMPLETED
        (CANCELLED when cancelling) with its last item."""
        ...

    async def start_items(self, items: Sequence[ItemRef]) -> list[ItemStart]:
        """``start_item(..., redelivery=True)`` for each item (of any batches and tenants), in
        one round trip; the answers in order."""
        ...

    async def attach_jobs(self, jobs: Sequence[tuple[ItemRef, str, str]]) -> list[bool]:
        """``attach_job`` for each (item, job id, session id), in one round trip."""
        ...

    async def finish_items(self, items: Sequence[tuple[ItemRef, ItemOutcome]]) -> list[int | None]:
        """``finish_item`` for each (item, outcome), in one round trip; the answers in order."""
        ...

    async def stop_batch(
        self, tenant_id: str, batch_id: str, state: BatchState, error: dict[str, object]
    ) -> tuple[Batch | None, list[RunningItem]]:
        """Stop an unfinished batch: ``state`` CANCELLED cancels queued items (the batch is
        CANCELLING while items run, CANCELLED when none does); EXPIRED expires every
        unfinished item, running ones included. Each stopped item gets a result with
        ``error``. Returns the batch after the change and the items that were running (their
        jobs are for the caller to cancel). A final batch is returned unchanged."""
        ...

    async def reopen_item(
        self, tenant_id: str, batch_id: str, index: int
    ) -> tuple[BatchState | None, ItemState | None]:
        """Make an item that a redrive of its dead letter should run QUEUED again: a FAILED
        one (its result leaves the stream, so the run's result replaces it, and the failed
        count goes back down) or one left RUNNING by deliveries that all died. A batch
        COMPLETED is IN_PROGRESS again (``finish_ms`` 0, kept as before it was final). Only
        while the batch is QUEUED, IN_PROGRESS or COMPLETED and inside its window; anything
        else changes nothing. Returns the batch's and the item's state after the call (the
        item QUEUED when a redrive will run it); None for a missing batch or item."""
        ...

    async def read_results(
        self, tenant_id: str, batch_id: str, after: int, *, limit: int, wait_s: float
    ) -> list[ItemResult]:
        """Up to ``limit`` results with sequence > ``after``, in order. When there are none,
        waits up to ``wait_s`` for one to be appended."""
        ...

    async def due_for_expiry(self, *, limit: int) -> list[tuple[str, str]]:
        """(tenant, batch id) of batches whose expiry passed and that may be unfinished."""
        ...

    async def forget_expiry(self, tenant_id: str, batch_id: str) -> None:
        """Drop a batch from the expiry schedule (it is final)."""
        ...

    async def scheduled_batches(self, *, limit: int) -> list[tuple[str, str]]:
        """(tenant, batch id) of up to ``limit`` batches on the expiry schedule, due or not:
        every unfinished batch, and final ones whose expiry was not yet forgotten."""
        ...

    async def running_items(self, tenant_id: str, batch_id: str) -> list[int]:
        """The indexes of the batch's RUNNING items (none for a missing batch)."""
        ...

"""Opening a work queue per backend for the queue tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from domain.ports.queue import NewWorkItem, QueueConfig, QueuePriority, WorkQueue
from registry.backend import BackendConfig, open_backend

# Short times so lease expiry, backoff and result expiry happen within a test.
CONFIG = QueueConfig(max_deliveries=3, retry_base_ms=50, retry_cap_ms=200, result_ttl_ms=600)
LEASE_MS = 300


@asynccontextmanager
async def open_queue(
    backend_url: str | None, config: QueueConfig = CONFIG, *, shards: int | None = None
) -> AsyncIterator[WorkQueue]:
    """A queue on the given backend (None: memory), closed afterwards; ``shards``: the Redis
    queue's shard count (None: the backend's default, 1 on one Redis, 8 on a cluster)."""
    backend = open_backend(
        BackendConfig(
            redis_url=backend_url,
            key_prefix="test",
            session_retention_ms=60_000,
            queue_shards=shards,
        )
    )
    try:
        yield backend.work_queue("work", config)
    finally:
        await backend.aclose()


def new_item(
    item_id: str,
    tenant: str = "t1",
    priority: QueuePriority = QueuePriority.NORMAL,
    payload: bytes | None = None,
    batch_id: str | None = None,
) -> NewWorkItem:
    return NewWorkItem(
        item_id=item_id,
        tenant_id=tenant,
        kind="test",
        payload=payload if payload is not None else item_id.encode(),
        priority=priority,
        batch_id=batch_id,
    )

"""One backend per process: its work queues are opened once per name, share its connections, and
close with it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from domain.ports.queue import QueueConfig
from registry.backend import Backend, BackendConfig, open_backend
from registry.redis_queue import RedisWorkQueue
from tests.registry.queue_fixtures import new_item


@pytest.fixture
async def backend(backend_url: str | None) -> AsyncIterator[Backend]:
    opened = open_backend(
        BackendConfig(redis_url=backend_url, key_prefix="test", session_retention_ms=60_000)
    )
    yield opened
    await opened.aclose()


async def test_a_queue_name_opens_one_queue_per_backend(backend: Backend) -> None:
    assert backend.work_queue("chat") is backend.work_queue("chat")
    assert backend.work_queue("chat") is not backend.work_queue("batch")


async def test_reopening_a_queue_with_another_config_is_refused(backend: Backend) -> None:
    backend.work_queue("chat", QueueConfig(max_deliveries=3))
    with pytest.raises(ValueError, match="chat"):
        backend.work_queue("chat", QueueConfig(max_deliveries=5))


async def test_queues_of_one_name_see_the_same_items(backend: Backend) -> None:
    await backend.work_queue("chat").enqueue([new_item("i1")])
    (item,) = await backend.work_queue("chat").dequeue("w", count=1, lease_ms=60_000)
    assert item.item_id == "i1"
    assert await backend.work_queue("batch").dequeue("w", count=1, lease_ms=60_000) == []


async def test_every_work_queue_shares_one_raw_redis_pool(redis_url: str) -> None:
    backend = open_backend(
        BackendConfig(redis_url=redis_url, key_prefix="test", session_retention_ms=60_000)
    )
    try:
        chat, batch = backend.work_queue("chat"), backend.work_queue("batch")
        assert isinstance(chat, RedisWorkQueue) and isinstance(batch, RedisWorkQueue)
        assert chat.redis.connection_pool is batch.redis.connection_pool
        assert not chat.redis.connection_pool.connection_kwargs.get("decode_responses")
    finally:
        await backend.aclose()

"""Crash recovery and boundedness of the Redis work queue, with worker *processes*
(tests/support/queue_worker_process.py) killed with SIGKILL mid-item; the queue in one shard
and in four."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from domain.ports.queue import QueueStats, WorkQueue
from registry.redis_queue import RedisWorkQueue
from tests.registry.queue_fixtures import new_item, open_queue

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
LEASE_S = 0.3


@pytest.fixture(params=[1, 4], ids=["1-shard", "4-shards"])
def shards(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
async def queue(redis_url: str, shards: int) -> AsyncIterator[RedisWorkQueue]:
    async with open_queue(redis_url, shards=shards) as opened:
        assert isinstance(opened, RedisWorkQueue)
        yield opened


class WorkerProcesses:
    """Worker processes started by a test; whatever is left is killed at teardown."""

    def __init__(self, redis_url: str, log_dir: Path, shards: int) -> None:
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.shards = shards
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, consumer: str, handler: str, concurrency: int = 4) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{consumer}.log").open("wb")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.queue_worker_process",
                "--url",
                self.redis_url,
                "--handler",
                handler,
                "--consumer",
                consumer,
                "--lease",
                str(LEASE_S),
                "--concurrency",
                str(concurrency),
                "--max-deliveries",
                "3",
                "--shards",
                str(self.shards),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def workers(redis_url: str, tmp_path: Path, shards: int) -> Iterator[WorkerProcesses]:
    started = WorkerProcesses(redis_url, tmp_path, shards)
    yield started
    started.kill_all()


async def wait_until_started(redis: Redis, queue: RedisWorkQueue, count: int) -> None:
    """Wait until the worker's handler has started ``count`` items (it pushes their ids)."""
    deadline = time.monotonic() + 20
    while await redis.llen(queue.prefix + "test:started") < count:
        assert time.monotonic() < deadline, "worker never started the items"
        await asyncio.sleep(0.01)


async def count_stored(redis: Redis, queue: RedisWorkQueue, stop: asyncio.Event) -> Counter[str]:
    """Count the "item finished" notices per item: one per stored result."""
    stored: Counter[str] = Counter()
    pubsub = redis.pubsub()
    await pubsub.subscribe(*(prefix + "ch:done" for prefix in queue.prefixes))
    try:
        while not stop.is_set():
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message is not None:
                stored.update(str(message["data"]).split(","))
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    return stored


async def assert_drained(redis: Redis, queue: WorkQueue) -> None:
    """Every stream entry was acknowledged and deleted: no stream, no pending entry is left."""
    assert await queue.stats() == QueueStats(0, 0, 0, 0)
    assert isinstance(queue, RedisWorkQueue)
    for prefix in queue.prefixes:
        assert await redis.keys(prefix + "s:*") == []
        assert await redis.smembers(prefix + "streams") == set()


async def test_items_of_a_killed_worker_are_reclaimed_and_finish_exactly_once(
    queue: RedisWorkQueue, redis_client: Redis, workers: WorkerProcesses
) -> None:
    stop = asyncio.Event()
    counting = asyncio.create_task(count_stored(redis_client, queue, stop))
    await asyncio.sleep(0.05)  # subscribed before any result
    ids = [f"i{n:02d}" for n in range(50)]
    await queue.enqueue([new_item(i, tenant=f"t{n % 3}") for n, i in enumerate(ids)])

    doomed = workers.start("doomed", "sleep:0.2", concurrency=4)
    await wait_until_started(redis_client, queue, 10)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    stats = await queue.stats()
    assert stats.leased > 0, stats  # it died holding items

    workers.start("survivor", "sleep:0.01", concurrency=8)
    results = await asyncio.gather(*(queue.wait_result(i, 30) for i in ids))
    await asyncio.sleep(0.2)  # let late notices (there must be none) arrive
    stop.set()
    stored = await counting

    assert [r.value if r else None for r in results] == [f"done:{i}".encode() for i in ids]
    assert stored == Counter(dict.fromkeys(ids, 1))  # 0 lost, each result stored once
    redelivered = [r.item_id for r in results if r and r.deliveries > 1]
    assert 1 <= len(redelivered) <= 4  # exactly the items in flight at the kill
    await assert_drained(redis_client, queue)


async def test_a_killed_workers_item_waits_for_its_lease_to_expire(
    queue: RedisWorkQueue, redis_client: Redis, workers: WorkerProcesses
) -> None:
    await queue.enqueue([new_item("long")])
    doomed = workers.start("doomed", "sleep:30", concurrency=1)
    await wait_until_started(redis_client, queue, 1)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    killed_at = time.monotonic()
    workers.start("survivor", "sleep:0", concurrency=1)
    result = await queue.wait_result("long", 20)
    assert result is not None
    assert (result.value, result.deliveries) == (b"done:long", 2)
    assert time.monotonic() - killed_at >= LEASE_S * 0.9  # not before the lease ran out
    await assert_drained(redis_client, queue)


async def test_sigterm_stops_a_worker_gracefully(
    queue: RedisWorkQueue, redis_client: Redis, workers: WorkerProcesses
) -> None:
    await queue.enqueue([new_item("i1")])
    proc = workers.start("polite", "sleep:0.3", concurrency=1)
    await wait_until_started(redis_client, queue, 1)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 10) == 0
    result = await queue.get_result("i1")
    assert result is not None
    assert (result.value, result.deliveries) == (b"done:i1", 1)
    await assert_drained(redis_client, queue)


async def test_streams_stay_bounded_while_work_flows(
    queue: RedisWorkQueue, redis_client: Redis, workers: WorkerProcesses
) -> None:
    workers.start("w1", "sleep:0", concurrency=8)
    max_len = 0
    for round_ in range(5):
        ids = [f"r{round_}-{n}" for n in range(100)]
        await queue.enqueue([new_item(i, tenant=f"t{n % 4}") for n, i in enumerate(ids)])
        results = await asyncio.gather(*(queue.wait_result(i, 20) for i in ids))
        assert all(r is not None for r in results)
        for prefix in queue.prefixes:
            for stream in await redis_client.smembers(prefix + "streams"):
                max_len = max(max_len, await redis_client.xlen(stream))
    assert max_len <= 100  # acknowledged entries are deleted, never piled up
    await assert_drained(redis_client, queue)


async def test_a_worker_process_dead_letters_failing_items_for_redrive(
    queue: RedisWorkQueue, redis_client: Redis, workers: WorkerProcesses
) -> None:
    await queue.enqueue([new_item("bad")])
    failing = workers.start("failing", "fail", concurrency=1)
    result = await queue.wait_result("bad", 20)
    assert result is not None
    assert result.error == "RuntimeError: failing bad"
    assert [(d.item_id, d.deliveries) for d in await queue.list_dead()] == [("bad", 3)]
    failing.kill()
    failing.wait()
    assert await queue.redrive("bad")
    workers.start("fixed", "sleep:0", concurrency=1)
    deadline = time.monotonic() + 20
    while (done := await queue.get_result("bad")) is None or done.value is None:
        assert time.monotonic() < deadline
        await queue.wait_result("bad", 1)
    assert (done.value, done.deliveries) == (b"done:bad", 1)
    await assert_drained(redis_client, queue)

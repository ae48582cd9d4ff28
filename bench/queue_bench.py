"""Work queue throughput against a raw Redis Streams loop, on a private redis-server.

(a) raw: XADD, XREADGROUP and XACK + XDEL on one stream, pipelined in batches of 100: the most
    a client of this language can push through a consumer group.
(b) queue: items through the whole path — enqueue (batches of 100), a QueueWorker leasing in
    batches with a no-op handler, compare-and-set completion with acknowledgement and stored
    result — from the first enqueue to the last stored result.

Both run in one process on the same server, so the ratio (b)/(a) measures the queue's own cost.
The machine is shared and noisy, so ``--rounds`` (default 3) alternating rounds of (a) then (b)
are run and the median of the rounds' ratios is the verdict; each path's figures are its median
round. Beside the rates: CPU per item of this process (the client: redis-py, the worker) and of
the redis-server (INFO cpu), which load on the machine moves far less than the rates.
Bounded: ``--items`` (default 20,000) per round and path, then it stops.
``--cluster`` runs the rounds again on a private 3-master Redis Cluster (every node on this
machine) and prints both backends' rows (median rounds) with the ratio cluster/single, and the
queue's CPU per item (client, and redis-server summed over the masters). ``--tenants`` spreads
the items over that many tenants (a tenant's items are in one shard of the queue, so one tenant
keeps a sharded queue's work on one shard); ``--shards`` sets the queue's shards (default: 1 on
one Redis, 8 on a cluster).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis, RedisCluster

from bench import machine
from bench.machine import Limits
from bench.processes import on_private_cluster, on_private_redis
from bench.tables import Rate, median_run, print_cluster_rows, print_table, quotient
from domain.ports.queue import NewWorkItem, QueueConfig, WorkItem
from domain.worker import QueueWorker
from registry.keys import KeySpace
from registry.redis_client import is_cluster
from registry.redis_queue import RedisWorkQueue, create_queue_redis

BATCH = 100
TARGET_RATIO = 0.8


@dataclass(frozen=True, slots=True)
class Measurement(Rate):
    """One path's run: ``items`` through it in ``seconds``; CPU seconds of this process and of
    the redis-server meanwhile (0 when not measured)."""

    COUNTED = "items"

    name: str
    items: int
    seconds: float
    client_cpu_s: float = 0.0
    redis_cpu_s: float = 0.0

    @property
    def client_us(self) -> float:
        """This process's CPU microseconds per item."""
        return self.client_cpu_s / self.items * 1e6 if self.items else 0.0

    @property
    def redis_us(self) -> float:
        """The redis-server's (every master's) CPU microseconds per item."""
        return self.redis_cpu_s / self.items * 1e6 if self.items else 0.0

    def cpu_us(self, seconds: float) -> str:
        """CPU seconds per item, in microseconds, for a table cell."""
        return f"{seconds / self.items * 1e6:.1f}" if self.items else "-"


async def _redis_cpu_s(redis: Redis) -> float:
    """CPU seconds of the redis-server, or of every master of a cluster together."""
    if is_cluster(redis):
        cluster = cast(RedisCluster, redis)
        await cluster.initialize()
        per_node = await cluster.info("cpu", target_nodes=RedisCluster.PRIMARIES)
        infos = list(per_node.values())
    else:
        infos = [await redis.info("cpu")]
    return sum(float(i["used_cpu_user"]) + float(i["used_cpu_sys"]) for i in infos)


async def with_cpu(url: str, run: Awaitable[Measurement]) -> Measurement:
    """``await run``, with this process' and the redis-server's CPU seconds meanwhile."""
    probe = create_queue_redis(url)
    client, server = time.process_time(), await _redis_cpu_s(probe)
    measured = await run
    client, server = time.process_time() - client, await _redis_cpu_s(probe) - server
    await probe.aclose()
    return Measurement(measured.name, measured.items, measured.seconds, client, server)


async def raw_streams(url: str, items: int) -> Measurement:
    """XADD / XREADGROUP / XACK+XDEL in pipelined batches."""
    redis = create_queue_redis(url)
    stream, group = "bench:raw", "g"
    await redis.xgroup_create(stream, group, id="0", mkstream=True)
    payload = b"x" * 64
    started = time.perf_counter()
    done = 0
    while done < items:
        size = min(BATCH, items - done)
        pipe = redis.pipeline(transaction=False)
        for _ in range(size):
            pipe.xadd(stream, {"d": payload})
        await pipe.execute()
        read = await redis.xreadgroup(group, "c1", {stream: ">"}, count=size)
        ids = _entry_ids(read)
        pipe = redis.pipeline(transaction=False)
        pipe.xack(stream, group, *ids)
        pipe.xdel(stream, *ids)
        await pipe.execute()
        done += len(ids)
    seconds = time.perf_counter() - started
    await redis.delete(stream)
    await redis.aclose()
    return Measurement("raw XADD/XREADGROUP/XACK", items, seconds)


def _entry_ids(read: Any) -> list[bytes]:
    """Entry ids of an XREADGROUP reply: RESP3 gives {stream: [[entries]]}, RESP2 a list of
    [stream, entries] pairs."""
    groups = list(read.values()) if isinstance(read, dict) else [pair[1] for pair in read or []]
    ids: list[bytes] = []
    for entries in groups:
        if entries and isinstance(entries[0], list):
            entries = entries[0]
        ids += [entry_id for entry_id, _ in entries]
    return ids


class _CountingQueue(RedisWorkQueue):
    """The Redis queue, announcing when ``expected`` results have been stored."""

    def __init__(self, redis: Redis, expected: int, queue: str, shards: int | None) -> None:
        super().__init__(
            redis,
            KeySpace("bench"),
            queue=queue,
            config=QueueConfig(result_ttl_ms=600_000),
            shards=shards,
        )
        self.expected = expected
        self.stored = 0
        self.all_stored = asyncio.Event()

    async def complete(self, results: Sequence[tuple[WorkItem, bytes]]) -> list[bool]:
        stored = await super().complete(results)
        self.stored += sum(stored)
        if self.stored >= self.expected:
            self.all_stored.set()
        return stored


@dataclass(frozen=True, slots=True)
class Shape:
    """What the queue path runs: items, worker concurrency, tenants the items are spread over
    (round robin) and the queue's shards (None: the backend's default)."""

    items: int
    concurrency: int
    tenants: int = 1
    shards: int | None = None


async def queue_path(url: str, shape: Shape, queue_name: str = "bench") -> Measurement:
    """enqueue -> QueueWorker (no-op handler) -> complete with stored result, on a queue of its
    own name (item ids are reused: a queue that knows them would skip them)."""
    items, concurrency = shape.items, shape.concurrency
    redis = create_queue_redis(url, max_connections=32)
    queue = _CountingQueue(redis, items, queue_name, shape.shards)

    async def no_op(item: WorkItem) -> bytes:
        return b"ok"

    worker = QueueWorker(queue, no_op, concurrency=concurrency, lease_s=30, poll_s=0.05)
    running = asyncio.create_task(worker.run())
    payload = b"x" * 64
    started = time.perf_counter()
    for start in range(0, items, BATCH):
        await queue.enqueue(
            [
                NewWorkItem(
                    item_id=f"i{n}",
                    tenant_id=f"t{n % shape.tenants + 1}",
                    kind="bench",
                    payload=payload,
                )
                for n in range(start, min(start + BATCH, items))
            ]
        )
    await asyncio.wait_for(queue.all_stored.wait(), 300)
    seconds = time.perf_counter() - started
    worker.stop()
    await running
    last = await queue.get_result(f"i{items - 1}")
    assert last is not None and last.value == b"ok"
    await queue.aclose()
    await redis.aclose()
    shards = queue.prefixes
    name = f"queue enqueue->worker->result (concurrency {concurrency})"
    if shape.tenants > 1 or len(shards) > 1:
        name += f", {shape.tenants} tenants, {len(shards)} shards"
    return Measurement(name, items, seconds)


@dataclass(frozen=True, slots=True)
class Rounds:
    """Alternating rounds of both paths: ``raw[i]`` ran just before ``queue[i]``."""

    raw: list[Measurement]
    queue: list[Measurement]

    def ratios(self) -> list[float]:
        return [
            quotient(q.per_second, r.per_second) for r, q in zip(self.raw, self.queue, strict=True)
        ]


def print_results(rounds: Rounds, limits: Limits) -> bool:
    """Print the table; whether the target is met (the median of the rounds' ratios)."""
    raw, full = median_run(rounds.raw), median_run(rounds.queue)
    ratios = rounds.ratios()
    queue_ratio = statistics.median(ratios)
    rows = [
        (
            "path (median round)",
            "items",
            "seconds",
            "items/s",
            "of bare unary",
            "client CPU us/item",
            "redis CPU us/item",
        ),
        *(
            (
                m.name,
                str(m.items),
                f"{m.seconds:.2f}",
                f"{m.per_second:,.0f}",
                fraction,
                m.cpu_us(m.client_cpu_s),
                m.cpu_us(m.redis_cpu_s),
            )
            for m, fraction in (
                (raw, limits.unary_fraction(raw.per_second)),
                (full, limits.unary_fraction(full.per_second)),
            )
        ),
        ("bare grpc.aio unary echo (calls/s)", "", "", f"{limits.unary_per_s:,.0f}", "1"),
    ]
    print_table(rows)
    limits.print_line()
    for name, runs in (("raw", rounds.raw), ("queue", rounds.queue)):
        print(f"{name} rounds (items/s): " + ", ".join(f"{m.per_second:,.0f}" for m in runs))
    met = queue_ratio >= TARGET_RATIO
    verdict = "ok" if met else "BELOW TARGET"
    print(
        f"ratio queue/raw = {queue_ratio:.2f} (median of the rounds: "
        f"{', '.join(f'{r:.2f}' for r in ratios)}; target >= {TARGET_RATIO}) {verdict}"
    )
    return met


async def measure(redis_url: str, shape: Shape, rounds: int) -> tuple[Rounds, Limits]:
    """Alternating (raw, queue) rounds on the same server, and the machine's bare grpc.aio
    figures."""
    measured = Rounds([], [])
    for n in range(rounds):
        measured.raw.append(await with_cpu(redis_url, raw_streams(redis_url, shape.items)))
        measured.queue.append(await with_cpu(redis_url, queue_path(redis_url, shape, f"bench{n}")))
    return measured, await machine.measure()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cluster", action="store_true", help="also on a private Redis Cluster")
    parser.add_argument(
        "--tenants", type=int, default=1, help="tenants the items are spread over (round robin)"
    )
    parser.add_argument(
        "--shards", type=int, default=0, help="shards of the queue (0: 1 on Redis, 8 on a cluster)"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.rounds < 1 or args.items < 1 or args.tenants < 1 or args.shards < 0:
        parser.error("--rounds, --items and --tenants must be at least 1, --shards at least 0")
    shape = Shape(args.items, args.concurrency, args.tenants, args.shards or None)
    rounds, limits = machine.run(on_private_redis(lambda url: measure(url, shape, args.rounds)))
    met = print_results(rounds, limits)
    if args.cluster:
        c_rounds, _ = machine.run(on_private_cluster(lambda url: measure(url, shape, args.rounds)))
        print("items/s, single Redis vs a 3-master Redis Cluster (same machine; median rounds):")
        raw, c_raw = median_run(rounds.raw), median_run(c_rounds.raw)
        single, cluster = median_run(rounds.queue), median_run(c_rounds.queue)
        if single.name != cluster.name:  # the shard counts differ (a cluster's default is 8)
            print(f"queue path, single Redis: {single.name}; cluster: {cluster.name}")
        print_cluster_rows(
            [
                (
                    m.name if m is raw else "queue enqueue->worker->result",
                    m.per_second,
                    c.per_second,
                    ",.0f",
                )
                for m, c in ((raw, c_raw), (single, cluster))
            ]
            + [
                ("queue: client CPU us/item", single.client_us, cluster.client_us, ".1f"),
                ("queue: redis CPU us/item, all masters", single.redis_us, cluster.redis_us, ".1f"),
            ]
        )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())

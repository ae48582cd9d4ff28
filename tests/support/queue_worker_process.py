"""A queue worker in its own process, for crash tests: ``python -m
tests.support.queue_worker_process --url redis://... --handler sleep:0.5``.

It runs domain.worker.QueueWorker against registry.redis_queue with a handler chosen on the
command line, so a test can kill -9 it mid-item. Handlers:

- ``sleep:<seconds>``: push the item id to ``<queue prefix>test:started``, sleep, then return
  ``b"done:" + payload`` (the test waits on the list to know an item is running).
- ``fail``: raise on every delivery.

SIGTERM stops it gracefully (finish or release in-flight items within the grace period).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from domain.ports.queue import QueueConfig, WorkItem
from domain.worker import Handler, QueueWorker
from registry.keys import KeySpace
from registry.redis_queue import RedisWorkQueue, create_queue_redis


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", default="test")
    parser.add_argument("--queue", default="work")
    parser.add_argument("--handler", default="sleep:0")
    parser.add_argument("--consumer", default=None)
    parser.add_argument("--lease", type=float, default=0.3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--grace", type=float, default=2.0)
    parser.add_argument("--max-deliveries", type=int, default=5)
    parser.add_argument("--shards", type=int, default=1)
    return parser.parse_args(argv)


def make_handler(spec: str, queue: RedisWorkQueue) -> Handler:
    name, _, arg = spec.partition(":")
    started_key = queue.prefix + "test:started"
    redis = queue.redis

    if name == "sleep":
        seconds = float(arg or 0)

        async def sleep_then_return(item: WorkItem) -> bytes:
            await redis.rpush(started_key, item.item_id)
            await asyncio.sleep(seconds)
            return b"done:" + item.payload

        return sleep_then_return
    if name == "fail":

        async def always_fail(item: WorkItem) -> bytes:
            raise RuntimeError(f"failing {item.item_id}")

        return always_fail
    raise SystemExit(f"unknown handler {spec!r}")


async def main_async(args: argparse.Namespace) -> None:
    redis = create_queue_redis(args.url)
    queue = RedisWorkQueue(
        redis,
        KeySpace(args.prefix),
        queue=args.queue,
        config=QueueConfig(max_deliveries=args.max_deliveries, retry_base_ms=50),
        shards=args.shards,
    )
    worker = QueueWorker(
        queue,
        make_handler(args.handler, queue),
        concurrency=args.concurrency,
        lease_s=args.lease,
        consumer=args.consumer,
        poll_s=0.1,
        grace_s=args.grace,
    )
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, worker.stop)
    print("worker ready", flush=True)
    try:
        await worker.run()
    finally:
        print(f"worker stopped {worker.stats}", flush=True)
        await queue.aclose()
        await redis.aclose()


def main(argv: list[str] | None = None) -> None:
    asyncio.run(main_async(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()

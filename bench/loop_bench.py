"""uvloop against asyncio's default event loop, for the servers, alternating in one run.

Every server under test runs in a child process on the loop named by ``ORCH_EVENT_LOOP`` (set
for the child only); this process drives the clients on one loop for both (asyncio), so the
difference is the servers'. Each round measures, in order asyncio then uvloop (uvloop first
in the next round, and so on), on one private redis-server:

- bare grpc.aio (bench.machine): unary echo calls/s, server-streaming messages/s (64 streams);
- chats: the ``llm`` shape of bench.plan_bench (support-bot, a plan of 4 calls, reference
  services embedded in the orchestrator's loop, step delay 0), 16 concurrent: chats/s and the
  child's CPU per chat (utime + stime, the reference services included), one orchestrator
  child per loop on the one Redis;
- fan-out (bench.flow_bench): 1,000 StreamSession streams over 100 sessions, delta notices
  published as fast as 8 streams go: delivered events/s, then p99 notice-to-client latency at
  half of that.

Each figure is the median over the rounds, the ratio the median of the per-round uvloop/asyncio
ratios. No target: it decides ``ORCH_EVENT_LOOP``'s default (README, Benchmarks).
``python -m bench.loop_bench [--rounds N] [--chats N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from bench import machine
from bench.flow_bench import create_sessions, fanout
from bench.options import chat_load_parser
from bench.plan_bench import SHAPES, TENANT, Side, child
from bench.processes import on_private_redis
from bench.tables import print_table, quotient
from server import event_loop
from tests.support.servers import tenant

LOOPS = ("asyncio", "uvloop")
LLM = next(shape for shape in SHAPES if shape.name == "llm")


@contextlib.contextmanager
def child_loop(loop: str) -> Iterator[None]:
    """Children started inside run on ``loop`` (they read ORCH_EVENT_LOOP at start)."""
    before = os.environ.get("ORCH_EVENT_LOOP")
    os.environ["ORCH_EVENT_LOOP"] = loop
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("ORCH_EVENT_LOOP", None)
        else:
            os.environ["ORCH_EVENT_LOOP"] = before


@dataclass
class Figures:
    """Per figure name, per loop, the value of each round."""

    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, name: str, loop: str, value: float) -> None:
        self.values.setdefault(name, {}).setdefault(loop, []).append(value)

    def rows(self) -> list[tuple[str, ...]]:
        rows: list[tuple[str, ...]] = [
            ("figure", "asyncio", "uvloop", "uvloop/asyncio", "each round: asyncio/uvloop")
        ]
        for name, by_loop in self.values.items():
            a, u = by_loop["asyncio"], by_loop["uvloop"]
            ratio = statistics.median(quotient(x, y) for x, y in zip(u, a, strict=True))
            median_a, median_u = statistics.median(a), statistics.median(u)
            rounds = ", ".join(f"{x:,.1f}/{y:,.1f}" for x, y in zip(a, u, strict=True))
            rows.append((name, f"{median_a:,.2f}", f"{median_u:,.2f}", f"{ratio:.3f}", rounds))
        return rows


async def measure(redis_url: str, args: argparse.Namespace) -> Figures:
    figures = Figures()
    with contextlib.ExitStack() as stack:
        sides: dict[str, Side] = {}
        for loop in LOOPS:
            with child_loop(loop):
                process, address = stack.enter_context(
                    child(["--serve-orchestrator", redis_url, "--plans"], f"orchestrator {loop}")
                )
            side = Side(loop, process, grpc.aio.insecure_channel(address), redis_url)
            side.sessions[LLM.name] = await _sessions(side, args.sessions)
            await side.drive(LLM, args.concurrency, args.concurrency, measured=False)
            sides[loop] = side
        try:
            for round_number in range(args.rounds):
                order = LOOPS if round_number % 2 == 0 else LOOPS[::-1]
                for loop in order:
                    with child_loop(loop):
                        limits = await machine.measure()
                    figures.add("bare unary echo, calls/s", loop, limits.unary_per_s)
                    figures.add("bare server-streaming, msgs/s", loop, limits.stream_messages_per_s)
                for loop in order:
                    side = sides[loop]
                    await side.drive(LLM, args.chats, args.concurrency, measured=True)
                    figures.add(
                        "chats (llm, plans), chats/s", loop, side.runs[LLM.name][-1].per_second
                    )
                    figures.add("chats, server CPU ms per chat", loop, side.cpu_ms[LLM.name][-1])
                for loop in order:
                    with child_loop(loop):
                        fan = await fanout(
                            redis_url,
                            sessions=100,
                            per_session=10,
                            notices=args.notices,
                            publishers=8,
                            paced_s=args.paced_seconds,
                        )
                    figures.add("fan-out, delivered events/s", loop, fan.per_second)
                    figures.add("fan-out p99 ms at half of peak", loop, fan.p99_ms)
        finally:
            for side in sides.values():
                await side.channel.close(None)
    return figures


async def _sessions(side: Side, count: int) -> list[str]:
    return await create_sessions(
        side.channel, count, agent_id=LLM.agent_id, metadata=tenant(TENANT)
    )


def main(argv: list[str] | None = None) -> int:
    p = chat_load_parser("bench.loop_bench", __doc__, chats_per="loop and round")
    p.set_defaults(rounds=3, chats=600, concurrency=16)
    p.add_argument("--sessions", type=int, default=160)
    p.add_argument("--notices", type=int, default=2000, help="fan-out notices at peak")
    p.add_argument("--paced-seconds", type=float, default=2.0)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING)
    figures = event_loop.run(on_private_redis(lambda url: measure(url, args)), "asyncio")
    print(
        f"event loops: servers in child processes on asyncio vs uvloop, clients on asyncio; "
        f"medians of {args.rounds} alternating rounds (uvloop/asyncio: median of the per-round "
        "ratios)"
    )
    print_table(figures.rows())
    return 0


if __name__ == "__main__":
    sys.exit(main())

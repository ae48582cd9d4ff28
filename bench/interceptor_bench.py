"""What the edge chain costs: unary GetSession latency and throughput at concurrency 16 on the
orchestrator's own server (memory registry) with the whole chain (server.edge: request context
+ metrics + identity + rate limit in one wrapper, limit set high enough never to refuse) beside
the same server with no edge at all.

Only the edge differs between the two: both are an ``OrchestratorServer`` with the same
settings, services, background tasks and server options, run the same SessionServicer and are
called by the same client code with the same metadata. The chain-less server cannot
authenticate, so its calls inherit a fixed caller bound in the context the server was started
from (every RPC task is a copy of that context): no per-call work stands in for the edge.

Rounds alternate between the servers (A B, B A, A B, ...), so drift and noise from other
processes land on both alike; the overhead is the median of the per-round paired ratios.
Client and servers share one event loop, as in the test suite, so the figures are end to end on
one core; compare the ratios, not the absolute numbers. Exits non-zero when the QPS overhead is
over the target.

``--redis`` runs both servers on a private redis-server instead (the bench key is stored there),
where the chain adds two Redis round trips per call (the key's record and the rate-limit script)
to the handler's one.

``--pin-cpu N`` runs the whole process (Python, gRPC's threads, client) on CPU N only. The
ratio is then much steadier from run to run, but it counts all the work on one core: the
transport work of the extra initial-metadata batch can no longer overlap on the other core, so
the overhead reads higher than unpinned.

Run with ``python -m bench.interceptor_bench [--calls N] [--rounds R] [--concurrency C]
[--redis] [--pin-cpu N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from domain.api_keys import record_for_plaintext
from domain.identity import Caller, Role, bind_caller, unbind_caller
from orchestrator.v1 import session_pb2, session_pb2_grpc
from server.app import OrchestratorServer
from server.config import Settings
from server.edge import Edge
from tests.support.redis_process import RedisProcess

TENANT = "demo"
TARGET_OVERHEAD_PCT = 15.0
# The documented demo client key (tenant "demo"), which servers on the in-memory registry accept.
API_KEY = "ao_democlient_local-demo-client-key-0001"
METADATA = (("authorization", f"Bearer {API_KEY}"),)
BASELINE = "no interceptors"
CHAINED = "edge chain"


@dataclass(slots=True)
class Result:
    """One server's measurements over every round."""

    name: str
    qps: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self.latencies)

    @property
    def median_qps(self) -> float:
        return statistics.median(self.qps)

    def percentile_ms(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] * 1000


@dataclass(frozen=True, slots=True)
class Comparison:
    baseline: Result
    chained: Result

    @property
    def paired_overheads(self) -> list[float]:
        """Per round: QPS lost by the chain, in percent of the baseline's in the same round."""
        return [
            (base - chained) / base * 100
            for base, chained in zip(self.baseline.qps, self.chained.qps, strict=True)
        ]

    @property
    def overhead_pct(self) -> float:
        return statistics.median(self.paired_overheads)

    @property
    def p50_overhead_pct(self) -> float:
        base = self.baseline.percentile_ms(0.5)
        return (self.chained.percentile_ms(0.5) - base) / base * 100


class _NoEdgeServer(OrchestratorServer):
    """The orchestrator's server with its services registered bare."""

    def edge(self) -> Edge | None:
        return None


def _settings(redis_url: str | None = None) -> Settings:
    return Settings(
        listen_address="127.0.0.1:0",
        metrics_address="",
        ws_address="",
        redis_url=redis_url,
        rate_limit_rps=1_000_000.0,
        rate_limit_burst=1_000_000,
        health_interval=5.0,
    )


async def _start_baseline(redis_url: str | None = None) -> OrchestratorServer:
    """The chain-less server, started with the bench caller bound so its RPC tasks inherit it."""
    server = _NoEdgeServer(_settings(redis_url))
    token = bind_caller(Caller(tenant_id=TENANT, role=Role.CLIENT))
    try:
        await server.start()
    finally:
        unbind_caller(token)
    return server


async def _load(
    call: Callable[[], Awaitable[Any]], calls: int, concurrency: int
) -> tuple[list[float], float]:
    latencies: list[float] = []
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - start


async def _session_getter(
    stack: contextlib.AsyncExitStack, port: int
) -> Callable[[], Awaitable[Any]]:
    """A GetSession call on a session created for the bench, with the bench's metadata."""
    channel = await stack.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
    stub = session_pb2_grpc.SessionServiceStub(channel)
    created = await stub.CreateSession(
        session_pb2.CreateSessionRequest(agent_id="bench-agent"), metadata=METADATA
    )
    request = session_pb2.GetSessionRequest(session_id=created.session.session_id)

    def call() -> Awaitable[Any]:
        return stub.GetSession(request, metadata=METADATA)

    return call


async def _measure(ports: tuple[int, int], calls: int, concurrency: int, rounds: int) -> Comparison:
    comparison = Comparison(Result(BASELINE), Result(CHAINED))
    results = (comparison.baseline, comparison.chained)
    async with contextlib.AsyncExitStack() as stack:
        getters = [await _session_getter(stack, port) for port in ports]
        for getter in getters:
            await _load(getter, min(500, calls), concurrency)  # warm up
        for round_number in range(rounds):
            order = (0, 1) if round_number % 2 == 0 else (1, 0)
            for i in order:
                latencies, elapsed = await _load(getters[i], calls, concurrency)
                results[i].qps.append(len(latencies) / elapsed)
                results[i].latencies.extend(latencies)
    return comparison


async def run(
    calls: int, concurrency: int, rounds: int, redis_url: str | None = None
) -> Comparison:
    baseline = await _start_baseline(redis_url)
    chained = OrchestratorServer(_settings(redis_url))
    await chained.start()
    # The in-memory registry knows the demo key; a Redis one gets it stored.
    await chained.api_keys.ensure(record_for_plaintext(API_KEY, TENANT, Role.CLIENT, "bench"))
    try:
        return await _measure((baseline.port, chained.port), calls, concurrency, rounds)
    finally:
        await chained.stop(grace=0)
        await baseline.stop(grace=0)


def report(
    comparison: Comparison, concurrency: int, registry: str = "memory", setup: str = ""
) -> str:
    rounds = len(comparison.baseline.qps)
    lines = [
        f"Edge chain: unary GetSession, concurrency {concurrency}, {registry} registry, "
        f"{rounds} interleaved rounds{setup}",
        f"{'server':<16} {'calls':>7} {'QPS (median)':>13} {'p50 ms':>8} {'p99 ms':>8}",
    ]
    for r in (comparison.baseline, comparison.chained):
        lines.append(
            f"{r.name:<16} {r.calls:>7} {r.median_qps:>13.0f} "
            f"{r.percentile_ms(0.5):>8.3f} {r.percentile_ms(0.99):>8.3f}"
        )
    paired = sorted(comparison.paired_overheads)
    pct = comparison.overhead_pct
    verdict = "within" if pct <= TARGET_OVERHEAD_PCT else "OVER"
    lines.append(
        f"overhead: {pct:.1f} % QPS (median of {rounds} paired rounds; quartiles "
        f"{paired[len(paired) // 4]:.1f}..{paired[(3 * len(paired)) // 4]:.1f}), "
        f"{comparison.p50_overhead_pct:.1f} % p50 latency; "
        f"{verdict} the {TARGET_OVERHEAD_PCT:.0f} % target"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="interceptor_bench", description=__doc__)
    parser.add_argument("--calls", type=int, default=1000, help="calls per server per round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=24, help="rounds (each runs both servers)")
    parser.add_argument(
        "--redis", action="store_true", help="both servers on a private redis-server"
    )
    parser.add_argument(
        "--pin-cpu", type=int, default=None, metavar="N", help="run on CPU N only (steadier)"
    )
    args = parser.parse_args(argv)
    logging.getLogger("server").setLevel(logging.ERROR)
    if args.pin_cpu is not None:
        os.sched_setaffinity(0, {args.pin_cpu})  # before gRPC starts its threads, which inherit it

    redis_server = RedisProcess() if args.redis else None
    if redis_server is not None:
        redis_server.start()
    try:
        url = redis_server.url if redis_server is not None else None
        comparison = asyncio.run(run(args.calls, args.concurrency, args.rounds, url))
    finally:
        if redis_server is not None:
            redis_server.close()
    print()
    setup = f", pinned to CPU {args.pin_cpu}" if args.pin_cpu is not None else ""
    print(report(comparison, args.concurrency, "Redis" if args.redis else "memory", setup))
    return 0 if comparison.overhead_pct <= TARGET_OVERHEAD_PCT else 1


if __name__ == "__main__":
    raise SystemExit(main())

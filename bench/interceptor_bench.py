"""What the edge chain costs: unary GetSession latency and throughput on a memory-backed server
with the whole chain (server.edge: request context + metrics + identity + rate limit in one
wrapper, limit set high enough never to refuse) beside the same servicer on a server with no
interceptors. Client and servers share one event loop, as in the test suite, so the figures
are end to end on one core; the overhead percentage is what matters.

Run with ``python -m bench.interceptor_bench [--calls N] [--concurrency C]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from domain.identity import Caller, Role, bind_caller
from domain.sessions import SessionManager, SessionPolicy
from handlers.sessions import SessionServicer
from orchestrator.v1 import session_pb2, session_pb2_grpc
from registry.memory_sessions import MemorySessionStore
from server.app import OrchestratorServer, server_options
from server.config import Settings
from server.edge import Edge
from server.interceptors import CallerInterceptor

TENANT = "demo"
TARGET_OVERHEAD_PCT = 15.0
# The documented demo client key, which servers on the in-memory registry accept.
METADATA = (("authorization", "Bearer ao_democlient_local-demo-client-key-0001"),)


@dataclass(frozen=True, slots=True)
class Result:
    name: str
    calls: int
    p50_ms: float
    p99_ms: float
    qps: float


class _BoundSessionServicer(SessionServicer):
    """The real servicer with the caller bound in the handler, for the chain-less server."""

    async def GetSession(
        self, request: session_pb2.GetSessionRequest, context: Any
    ) -> session_pb2.GetSessionResponse:
        bind_caller(Caller(tenant_id=TENANT, role=Role.CLIENT))
        return await super().GetSession(request, context)

    async def CreateSession(
        self, request: session_pb2.CreateSessionRequest, context: Any
    ) -> session_pb2.CreateSessionResponse:
        bind_caller(Caller(tenant_id=TENANT, role=Role.CLIENT))
        return await super().CreateSession(request, context)


async def _bare_server() -> tuple[grpc.aio.Server, int]:
    """The servicer alone, on a server with the same options (message limits, keepalive,
    maximum concurrent RPCs) as the orchestrator's, so only the edge differs."""
    settings = _chain_settings()
    server = grpc.aio.server(
        options=server_options(settings),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    manager = SessionManager(
        MemorySessionStore(retention_ms=3_600_000),
        SessionPolicy(default_ttl_ms=3_600_000, max_ttl_ms=7 * 24 * 3_600_000),
    )
    session_pb2_grpc.add_SessionServiceServicer_to_server(_BoundSessionServicer(manager), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


class _IdentityOnlyServer(OrchestratorServer):
    """Identity alone (the standalone CallerInterceptor), for attribution: what request
    context, metrics and rate limits add on top of authentication."""

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
        return [CallerInterceptor(self.authenticator)]

    def edge(self) -> Edge | None:
        return None


def _chain_settings() -> Settings:
    return Settings(
        listen_address="127.0.0.1:0",
        metrics_address="",
        ws_address="",
        rate_limit_rps=1_000_000.0,
        rate_limit_burst=1_000_000,
        health_interval=5.0,
    )


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


async def _measure(
    names: list[str], ports: list[int], calls: int, concurrency: int, rounds: int
) -> list[Result]:
    """Best round per server. Rounds are interleaved across the servers (A B C A B C ...), so
    load from other processes on the machine biases every server alike."""
    async with contextlib.AsyncExitStack() as stack:
        calls_by_server: list[Callable[[], Awaitable[Any]]] = []
        for port in ports:
            channel = await stack.enter_async_context(
                grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            )
            stub = session_pb2_grpc.SessionServiceStub(channel)
            created = await stub.CreateSession(
                session_pb2.CreateSessionRequest(agent_id="bench-agent"), metadata=METADATA
            )
            request = session_pb2.GetSessionRequest(session_id=created.session.session_id)

            def bound(
                stub: session_pb2_grpc.SessionServiceAsyncStub = stub,
                request: session_pb2.GetSessionRequest = request,
            ) -> Awaitable[Any]:
                return stub.GetSession(request, metadata=METADATA)

            calls_by_server.append(bound)
            await _load(bound, min(500, calls), concurrency)  # warm up
        best: list[Result | None] = [None] * len(ports)
        for _ in range(rounds):
            for i, call in enumerate(calls_by_server):
                latencies, elapsed = await _load(call, calls, concurrency)
                latencies.sort()
                result = Result(
                    names[i],
                    len(latencies),
                    statistics.median(latencies) * 1000,
                    latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
                    len(latencies) / elapsed,
                )
                current = best[i]
                if current is None or result.qps > current.qps:
                    best[i] = result
        return [r for r in best if r is not None]


async def run(calls: int, concurrency: int, rounds: int) -> list[Result]:
    """[no interceptors, identity only, whole edge chain]."""
    bare, bare_port = await _bare_server()
    identity = _IdentityOnlyServer(_chain_settings())
    chained = OrchestratorServer(_chain_settings())
    await identity.start()
    await chained.start()
    try:
        return await _measure(
            ["no interceptors", "identity only", "edge chain"],
            [bare_port, identity.port, chained.port],
            calls,
            concurrency,
            rounds,
        )
    finally:
        await chained.stop(grace=0)
        await identity.stop(grace=0)
        await bare.stop(None)


def overhead_pct(baseline: Result, full: Result) -> float:
    """Throughput lost against ``baseline``, in percent of the baseline's."""
    return (baseline.qps - full.qps) / baseline.qps * 100


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="interceptor_bench", description=__doc__)
    parser.add_argument("--calls", type=int, default=3000, help="calls per measured round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds; each server's best is shown"
    )
    args = parser.parse_args(argv)
    logging.getLogger("server").setLevel(logging.ERROR)

    results = asyncio.run(run(args.calls, args.concurrency, args.rounds))
    baseline, identity, full = results
    print(f"\nInterceptor chain: unary GetSession, concurrency {args.concurrency}, memory registry")
    print(f"{'server':<18} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8} {'QPS':>9} {'overhead':>9}")
    for r in results:
        print(
            f"{r.name:<18} {r.calls:>6} {r.p50_ms:>8.3f} {r.p99_ms:>8.3f} {r.qps:>9.0f} "
            f"{overhead_pct(baseline, r):>8.1f}%"
        )
    pct = overhead_pct(baseline, full)
    p50_pct = (full.p50_ms - baseline.p50_ms) / baseline.p50_ms * 100
    verdict = "within" if pct <= TARGET_OVERHEAD_PCT else "OVER"
    print(
        f"overhead: {pct:.1f} % QPS, {p50_pct:.1f} % p50 "
        f"({verdict} the {TARGET_OVERHEAD_PCT:.0f} % target); "
        f"context + metrics + rate limit over identity alone: {overhead_pct(identity, full):.1f} %"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

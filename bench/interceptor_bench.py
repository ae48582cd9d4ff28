"""What the edge chain costs: unary GetSession latency and throughput at concurrency 16 on the
orchestrator's own server (memory registry) with the whole chain (server.edge: request context
+ metrics + identity + rate limit in one wrapper, limit set high enough never to refuse) beside
the same server with no edge at all.

Two more servers run in the same rounds, to show where the cost is: the chain with
``ORCH_UNARY_REQUEST_ID=initial`` (the request id returned in the response headers instead of
the trailers, the default), and a server that does nothing but echo a request id in the initial
metadata (the extra send-initial-metadata batch grpc.aio needs for it on a unary call). The
target applies to the chain with its default settings.

Beside QPS, each row shows the process CPU time per call (client, servers and gRPC's threads:
everything in this process) measured over the same load phases: it moves far less than QPS
when other processes share the machine.

Only the edge differs between the two: both are an ``OrchestratorServer`` with the same
settings, services, background tasks and server options, run the same SessionServicer and are
called by the same client code with the same metadata. The chain-less server cannot
authenticate, so its calls inherit a fixed caller bound in the context the server was started
from (every RPC task is a copy of that context): no per-call work stands in for the edge.

Rounds alternate the order of the servers (A B C D, D C B A, ...), so drift and noise from other
processes land on both alike; the overhead is the median of the per-round paired ratios.
Client and servers share one event loop, as in the test suite, so the figures are end to end on
one core; compare the ratios, not the absolute numbers. Exits non-zero when the QPS overhead is
over the target.

On Redis (``--registry redis``) every server runs on a private redis-server instead (the bench
key is stored there), where the chain adds one Redis round trip per call (the rate-limit script,
which checks the key's standing too; the key's record is read on its first call only) to the
handler's one.

``--pin-cpu N`` runs the whole process (Python, gRPC's threads, client) on CPU N only. The
ratio is then much steadier from run to run, but it counts all the work on one core: the
transport work of the extra initial-metadata batch can no longer overlap on the other core, so
the overhead reads higher than unpinned.

Run with ``python -m bench.interceptor_bench [--calls N] [--rounds R] [--concurrency C]
[--registry memory|redis|both] [--pin-cpu N]`` (both, the default: the memory table, then the
Redis one; the targets are 10 % on memory and 20 % on Redis).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench import machine
from bench.machine import Limits
from domain.api_keys import record_for_plaintext
from domain.identity import Caller, Role
from handlers.request_context import REQUEST_ID_HEADER, bind_request_context, new_request_id
from orchestrator.v1 import session_pb2, session_pb2_grpc
from server.app import OrchestratorServer
from server.config import Settings
from server.edge import Edge
from server.edge_limits import EdgeLimits
from server.wrapping import Ctx
from tests.support.redis_process import RedisProcess

TENANT = "demo"
# QPS overhead targets (issue 16), by registry.
TARGET_OVERHEAD_PCT = {"memory": 10.0, "Redis": 20.0}
# The documented demo client key (tenant "demo"), which servers on the in-memory registry accept.
API_KEY = "ao_democlient_local-demo-client-key-0001"
METADATA = (("authorization", f"Bearer {API_KEY}"),)
BASELINE = "no interceptors"
CHAINED = "edge chain"
INITIAL = "edge, id initial"
ECHO_ONLY = "id echo only"


@dataclass(slots=True)
class Result:
    """One server's measurements over every round."""

    name: str
    qps: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    cpu_per_call: list[float] = field(default_factory=list)

    @property
    def median_cpu_us(self) -> float:
        return statistics.median(self.cpu_per_call) * 1e6

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
    """Every server's results; the first is the baseline the others are compared with."""

    results: tuple[Result, ...]

    @property
    def baseline(self) -> Result:
        return self.results[0]

    @property
    def chained(self) -> Result:
        """The whole chain with default settings: what the target applies to."""
        return self.result(CHAINED)

    def result(self, name: str) -> Result:
        return next(r for r in self.results if r.name == name)

    def paired_overheads(self, result: Result) -> list[float]:
        """Per round: QPS lost by ``result``'s server, in percent of the baseline's in the
        same round."""
        return [
            (base - other) / base * 100
            for base, other in zip(self.baseline.qps, result.qps, strict=True)
        ]

    def overhead_pct(self, result: Result) -> float:
        return statistics.median(self.paired_overheads(result))

    def cpu_overhead_pct(self, result: Result) -> float:
        """Median per round of the extra process CPU per call, in percent of the baseline's."""
        return statistics.median(
            (other - base) / base * 100
            for base, other in zip(self.baseline.cpu_per_call, result.cpu_per_call, strict=True)
        )

    def p50_overhead_pct(self, result: Result) -> float:
        base = self.baseline.percentile_ms(0.5)
        return (result.percentile_ms(0.5) - base) / base * 100


class _NoEdgeServer(OrchestratorServer):
    """The orchestrator's server with its services registered bare."""

    def edge(self) -> Edge | None:
        return None


class _EchoOnlyEdge(Edge):
    """No chain at all, only a request id echoed in the initial metadata of unary calls."""

    def wrap(self, method: str, handler: Any) -> Any:
        if handler is None or handler.unary_unary is None:
            return handler
        behavior = handler.unary_unary

        async def run(request: Any, context: Ctx) -> Any:
            await context.send_initial_metadata(((REQUEST_ID_HEADER, new_request_id()),))
            return await behavior(request, context)

        return handler._replace(unary_unary=run)


class _EchoOnlyServer(OrchestratorServer):
    """The orchestrator's server whose services only echo a request id."""

    def edge(self) -> Edge | None:
        no_limits = EdgeLimits(None, self.settings.rate_limit_rules())
        return _EchoOnlyEdge(self.metrics, self.authenticator, no_limits)


def _settings(redis_url: str | None = None) -> Settings:
    return Settings(
        listen_address="127.0.0.1:0",
        metrics_address="",
        ws_address="",
        redis_url=redis_url,
        rate_limit_rps=1_000_000.0,
        rate_limit_burst=1_000_000,
        health_interval=5.0,
        # The bench measures the edge, with no Agent Management behind it: any agent id.
        agent_check=False,
        plans=False,
    )


async def _start_with_bench_caller(server: OrchestratorServer) -> OrchestratorServer:
    """A server without identity, started in a context with the bench caller bound so its RPC
    tasks (copies of that context) inherit it."""
    context = contextvars.copy_context()
    context.run(bind_request_context, "", None, "", Caller(tenant_id=TENANT, role=Role.CLIENT))
    await asyncio.create_task(server.start(), context=context)
    return server


async def _start_chained(settings: Settings) -> OrchestratorServer:
    server = OrchestratorServer(settings)
    await server.start()
    # The in-memory registry knows the demo key; a Redis one gets it stored.
    await server.api_keys.ensure(record_for_plaintext(API_KEY, TENANT, Role.CLIENT, "bench"))
    return server


async def _start_all(redis_url: str | None) -> dict[str, OrchestratorServer]:
    """Every compared server, by name, the baseline first."""
    settings = _settings(redis_url)
    initial = dataclasses.replace(settings, unary_request_id="initial")
    return {
        BASELINE: await _start_with_bench_caller(_NoEdgeServer(settings)),
        CHAINED: await _start_chained(settings),
        INITIAL: await _start_chained(initial),
        ECHO_ONLY: await _start_with_bench_caller(_EchoOnlyServer(settings)),
    }


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


async def _measure(ports: dict[str, int], calls: int, concurrency: int, rounds: int) -> Comparison:
    results = tuple(Result(name) for name in ports)
    async with contextlib.AsyncExitStack() as stack:
        getters = [await _session_getter(stack, port) for port in ports.values()]
        for getter in getters:
            await _load(getter, min(500, calls), concurrency)  # warm up
        forward = list(range(len(getters)))
        for round_number in range(rounds):
            for i in forward if round_number % 2 == 0 else forward[::-1]:
                cpu = time.process_time()
                latencies, elapsed = await _load(getters[i], calls, concurrency)
                results[i].cpu_per_call.append((time.process_time() - cpu) / len(latencies))
                results[i].qps.append(len(latencies) / elapsed)
                results[i].latencies.extend(latencies)
    return Comparison(results)


async def run(
    calls: int, concurrency: int, rounds: int, redis_url: str | None = None
) -> Comparison:
    servers = await _start_all(redis_url)
    try:
        ports = {name: server.port for name, server in servers.items()}
        return await _measure(ports, calls, concurrency, rounds)
    finally:
        for server in servers.values():
            await server.stop(grace=0)


def report(
    comparison: Comparison,
    concurrency: int,
    registry: str = "memory",
    setup: str = "",
    limits: Limits | None = None,
) -> str:
    rounds = len(comparison.baseline.qps)
    lines = [
        f"Edge chain: unary GetSession, concurrency {concurrency}, {registry} registry, "
        f"{rounds} interleaved rounds{setup}",
        f"{'server':<18} {'calls':>7} {'QPS (median)':>13} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'CPU us/call':>12} {'QPS overhead (quartiles)':>26} {'p50 overhead':>13} "
        f"{'CPU overhead':>13}" + (f" {'of bare unary':>14}" if limits else ""),
    ]
    for r in comparison.results:
        row = (
            f"{r.name:<18} {r.calls:>7} {r.median_qps:>13.0f} "
            f"{r.percentile_ms(0.5):>8.3f} {r.percentile_ms(0.99):>8.3f} "
            f"{r.median_cpu_us:>12.0f}"
        )
        if r is not comparison.baseline:
            paired = sorted(comparison.paired_overheads(r))
            spread = f"{paired[len(paired) // 4]:.1f}..{paired[(3 * len(paired)) // 4]:.1f}"
            row += (
                f" {comparison.overhead_pct(r):>10.1f} % ({spread:>11})"
                f" {comparison.p50_overhead_pct(r):>11.1f} %"
                f" {comparison.cpu_overhead_pct(r):>11.1f} %"
            )
        elif limits:
            row += f" {'':>26} {'':>13} {'':>13}"
        if limits:
            row += f" {limits.unary_fraction(r.median_qps):>14}"
        lines.append(row)
    if limits:
        lines.append(
            f"{'bare grpc.aio echo':<18} {'':>7} {limits.unary_per_s:>13.0f} "
            f"(unary echo, {limits.unary_concurrency} concurrent, server in its own process)"
        )
    pct = comparison.overhead_pct(comparison.chained)
    target = TARGET_OVERHEAD_PCT[registry]
    verdict = "within" if pct <= target else "OVER"
    lines.append(
        f"{CHAINED} (default settings): {pct:.1f} % QPS overhead (median of {rounds} paired "
        f"rounds), {verdict} the {target:.0f} % target on the {registry} registry"
    )
    return "\n".join(lines)


async def _run_with_limits(
    args: argparse.Namespace, redis_url: str | None
) -> tuple[Comparison, Limits]:
    comparison = await run(args.calls, args.concurrency, args.rounds, redis_url)
    return comparison, await machine.measure(concurrency=args.concurrency)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="interceptor_bench", description=__doc__)
    parser.add_argument("--calls", type=int, default=1000, help="calls per server per round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=24, help="rounds (each runs both servers)")
    parser.add_argument(
        "--registry",
        choices=("memory", "redis", "both"),
        default="both",
        help="which registry the servers use (both: memory first, then a private redis-server)",
    )
    parser.add_argument("--redis", action="store_true", help="the same as --registry redis")
    parser.add_argument(
        "--pin-cpu", type=int, default=None, metavar="N", help="run on CPU N only (steadier)"
    )
    args = parser.parse_args(argv)
    logging.getLogger("server").setLevel(logging.ERROR)
    if args.pin_cpu is not None:
        os.sched_setaffinity(0, {args.pin_cpu})  # before gRPC starts its threads, which inherit it
    registries = ["redis"] if args.redis else ["memory", "redis"]
    if not args.redis and args.registry != "both":
        registries = [args.registry]
    setup = f", pinned to CPU {args.pin_cpu}" if args.pin_cpu is not None else ""
    status = 0
    for registry in registries:
        redis_server = RedisProcess() if registry == "redis" else None
        if redis_server is not None:
            redis_server.start()
        try:
            url = redis_server.url if redis_server is not None else None
            comparison, limits = machine.run(_run_with_limits(args, url))
        finally:
            if redis_server is not None:
                redis_server.close()
        name = "Redis" if registry == "redis" else "memory"
        print()
        print(report(comparison, args.concurrency, name, setup, limits), flush=True)
        if comparison.overhead_pct(comparison.chained) > TARGET_OVERHEAD_PCT[name]:
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())

"""The lock-free RPC metrics expose exactly what prometheus_client's own Counter and Histogram
would for the same calls (creation timestamps aside)."""

from __future__ import annotations

import re

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from server.metrics import LATENCY_BUCKETS, Metrics
from server.rpc_metrics import DURATION, DURATION_HELP, RPCS, RPCS_HELP

CALLS = [
    ("/a.B/Get", grpc.StatusCode.OK, 0.0007),
    ("/a.B/Get", grpc.StatusCode.OK, 0.0005),  # on a bucket bound: counted in that bucket
    ("/a.B/Get", grpc.StatusCode.NOT_FOUND, 2.0),
    ("/a.B/List", grpc.StatusCode.OK, 400.0),  # past the last bound: +Inf only
]


def rpc_lines(exposition: bytes) -> list[str]:
    lines = [line for line in exposition.decode().splitlines() if "orchestrator_rpc" in line]
    return sorted(re.sub(r"(_created\{.*\}) \S+$", r"\1 <time>", line) for line in lines)


def native(calls: list[tuple[str, grpc.StatusCode, float]]) -> bytes:
    registry = CollectorRegistry(auto_describe=True)
    rpcs = Counter(RPCS, RPCS_HELP, ["method", "code"], registry=registry)
    duration = Histogram(
        DURATION, DURATION_HELP, ["method"], buckets=LATENCY_BUCKETS, registry=registry
    )
    for method, code, seconds in calls:
        rpcs.labels(method, code.name).inc()
        duration.labels(method).observe(seconds)
    return generate_latest(registry)


def test_the_exposition_matches_prometheus_client_counters_and_histograms() -> None:
    metrics = Metrics()
    assert rpc_lines(metrics.exposition()) == rpc_lines(native([]))
    for method, code, seconds in CALLS:
        metrics.recorder(method).observe(code, seconds)
    assert rpc_lines(metrics.exposition()) == rpc_lines(native(CALLS))
    assert 'orchestrator_rpc_duration_seconds_bucket{le="+Inf",method="/a.B/Get"} 3.0' in (
        metrics.exposition().decode()
    )

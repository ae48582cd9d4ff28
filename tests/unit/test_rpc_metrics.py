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


def test_the_standard_grpc_names_count_calls_by_type_service_method_and_code() -> None:
    metrics = Metrics()
    metrics.recorder("/a.v1.B/Get", "unary").observe(grpc.StatusCode.OK, 0.0007)
    metrics.recorder("/a.v1.B/Get").observe(grpc.StatusCode.NOT_FOUND, 2.0)
    metrics.recorder("/a.v1.B/Follow", "server_stream").observe(grpc.StatusCode.CANCELLED, 40.0)
    text = metrics.exposition().decode()
    get = 'grpc_method="Get",grpc_service="a.v1.B",grpc_type="unary"'
    assert f'grpc_server_handled_total{{grpc_code="OK",{get}}} 1.0' in text
    assert f'grpc_server_handled_total{{grpc_code="NOT_FOUND",{get}}} 1.0' in text
    follow = 'grpc_method="Follow",grpc_service="a.v1.B",grpc_type="server_stream"'
    assert f'grpc_server_handled_total{{grpc_code="CANCELLED",{follow}}} 1.0' in text
    assert f"grpc_server_handling_seconds_count{{{get}}} 2.0" in text
    assert f'grpc_server_handling_seconds_bucket{{{get},le="0.001"}} 1.0' in text
    assert f'grpc_server_handling_seconds_bucket{{{follow},le="30.0"}} 0.0' in text


def test_the_standard_histogram_matches_the_orchestrator_one() -> None:
    metrics = Metrics()
    for method, code, seconds in CALLS:
        metrics.recorder(method).observe(code, seconds)
    lines = metrics.exposition().decode().splitlines()

    def values(prefix: str) -> list[str]:
        return sorted(line.rsplit(" ", 1)[1] for line in lines if line.startswith(prefix))

    assert values("grpc_server_handling_seconds_bucket") == values(
        "orchestrator_rpc_duration_seconds_bucket"
    )
    assert values("grpc_server_handled_total") == values("orchestrator_rpcs_total")


def test_tenant_labels_past_the_bound_are_counted_as_other() -> None:
    metrics = Metrics(max_tenants=2)
    for tenant in ("a", "b", "c", "d", "a"):
        metrics.record_tokens(tenant, 10)
        metrics.record_rate_limited(tenant, "tenant")
    text = metrics.exposition().decode()
    assert 'orchestrator_tokens_total{tenant="a"} 20.0' in text
    assert 'orchestrator_tokens_total{tenant="b"} 10.0' in text
    assert 'orchestrator_tokens_total{tenant="_other"} 20.0' in text
    assert 'tenant="c"' not in text
    assert 'orchestrator_rate_limited_total{limit="tenant",tenant="_other"} 2.0' in text

"""The benchmarks' cluster variants run end to end (tiny sizes: this checks they work, not
speed): the flow and queue paths on a private Redis Cluster, and the command lines that put
a cluster's rows beside the single Redis's in one run."""

from __future__ import annotations

import socket

import pytest

from bench import flow_bench, queue_bench
from bench.processes import on_private_cluster
from registry.redis_client import create_redis
from registry.redis_url import parse_redis_url


def _refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except OSError:
        return True
    return False


async def test_a_private_cluster_is_stopped_even_when_the_measure_fails() -> None:
    urls: list[str] = []

    async def measure(url: str) -> None:
        urls.append(url)
        client = create_redis(url, socket_timeout_s=2.0, connect_timeout_s=1.0)
        try:
            assert await client.ping()
        finally:
            await client.aclose()
        raise RuntimeError("the measure failed")

    with pytest.raises(RuntimeError, match="the measure failed"):
        await on_private_cluster(measure)
    seeds = parse_redis_url(urls[0]).seeds
    assert len(seeds) == 3 and all(_refused(host, port) for host, port in seeds)


async def test_chats_and_fanout_run_on_the_cluster(cluster_url: str) -> None:
    chats = await flow_bench.chats_on_orchestrator(
        cluster_url, chats=20, concurrency=4, sessions=8, deltas=2, name="on the cluster"
    )
    assert chats.chats == 20 and chats.per_second > 0 and chats.redis_cpu_ms > 0
    fan = await flow_bench.fanout(
        cluster_url, sessions=4, per_session=3, notices=40, publishers=2, paced_s=0.3
    )
    assert fan.delivered == 120 and fan.paced_delivered > 0 and fan.p99_ms >= fan.p50_ms > 0


async def test_the_queue_paths_run_on_the_cluster(cluster_url: str) -> None:
    raw = await queue_bench.raw_streams(cluster_url, 300)
    full = await queue_bench.queue_path(cluster_url, queue_bench.Shape(300, concurrency=8))
    assert raw.items == full.items == 300 and raw.per_second > 0 and full.per_second > 0
    spread = await queue_bench.queue_path(
        cluster_url, queue_bench.Shape(300, concurrency=8, tenants=16), "spread"
    )
    assert spread.items == 300 and "16 tenants, 8 shards" in spread.name


def test_the_flow_bench_prints_single_and_cluster_rows(capsys: pytest.CaptureFixture[str]) -> None:
    tiny = ["--chats", "20", "--concurrency", "4", "--sessions", "8", "--cluster"]
    flow_bench.main(["--only", "chats", *tiny])
    fanout = ["--fanout-sessions", "4", "--followers", "3", "--notices", "40", "--publishers", "2"]
    flow_bench.main(["--only", "fanout", *fanout, "--paced-seconds", "0.3", "--cluster"])
    out = capsys.readouterr().out
    assert "orchestrator (Redis)" in out and "orchestrator (Redis Cluster)" in out
    assert "fan-out on the cluster:" in out
    assert out.count("cluster/single") == 2 and "peak delivered events/s" in out


def test_the_queue_bench_prints_single_and_cluster_rows(capsys: pytest.CaptureFixture[str]) -> None:
    queue_bench.main(["--items", "300", "--concurrency", "8", "--cluster"])
    out = capsys.readouterr().out
    assert "ratio queue/raw" in out and "cluster/single" in out
    assert out.count("raw XADD/XREADGROUP/XACK") == 2
    assert "queue: redis CPU us/item, all masters" in out

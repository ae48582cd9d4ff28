"""The interceptor benchmark runs end to end (tiny sizes: this checks it works, not speed)."""

from __future__ import annotations

from bench import interceptor_bench


async def test_the_interceptor_bench_measures_every_server_in_interleaved_rounds() -> None:
    comparison = await interceptor_bench.run(calls=40, concurrency=4, rounds=2)
    assert [r.name for r in comparison.results] == [
        "no interceptors",
        "edge chain",
        "edge, id initial",
        "id echo only",
    ]
    for r in comparison.results:
        assert r.calls == 80 and len(r.qps) == 2 and all(q > 0 for q in r.qps)
        assert len(r.cpu_per_call) == 2 and all(c > 0 for c in r.cpu_per_call)
        assert r.percentile_ms(0.99) >= r.percentile_ms(0.5)
        assert len(comparison.paired_overheads(r)) == 2
    report = interceptor_bench.report(comparison, concurrency=4)
    assert "edge chain (default settings):" in report and "target" in report


async def test_the_interceptor_bench_runs_on_redis(redis_url: str) -> None:
    comparison = await interceptor_bench.run(calls=20, concurrency=4, rounds=1, redis_url=redis_url)
    assert all(r.calls == 20 for r in comparison.results)
    report = interceptor_bench.report(comparison, concurrency=4, registry="Redis")
    assert "20 % target on the Redis registry" in report

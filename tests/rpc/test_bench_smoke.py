"""The interceptor benchmark runs end to end (tiny sizes: this checks it works, not speed)."""

from __future__ import annotations

from bench import interceptor_bench


async def test_the_interceptor_bench_measures_both_servers_in_interleaved_rounds() -> None:
    comparison = await interceptor_bench.run(calls=40, concurrency=4, rounds=2)
    results = (comparison.baseline, comparison.chained)
    assert [r.name for r in results] == ["no interceptors", "edge chain"]
    for r in results:
        assert r.calls == 80 and len(r.qps) == 2 and all(q > 0 for q in r.qps)
        assert r.percentile_ms(0.99) >= r.percentile_ms(0.5)
    assert len(comparison.paired_overheads) == 2
    assert "overhead:" in interceptor_bench.report(comparison, concurrency=4)


async def test_the_interceptor_bench_runs_on_redis(redis_url: str) -> None:
    comparison = await interceptor_bench.run(calls=20, concurrency=4, rounds=1, redis_url=redis_url)
    assert comparison.baseline.calls == comparison.chained.calls == 20

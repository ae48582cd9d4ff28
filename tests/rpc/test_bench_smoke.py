"""The interceptor benchmark runs end to end (tiny sizes: this checks it works, not speed)."""

from __future__ import annotations

from bench import interceptor_bench


async def test_the_interceptor_bench_measures_all_three_servers() -> None:
    results = await interceptor_bench.run(calls=40, concurrency=4, rounds=1)
    assert [r.name for r in results] == ["no interceptors", "identity only", "edge chain"]
    assert all(r.calls == 40 and r.qps > 0 and r.p99_ms >= r.p50_ms for r in results)

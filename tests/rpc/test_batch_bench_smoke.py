"""The batch benchmark runs end to end (tiny sizes: this checks it works, not speed)."""

from __future__ import annotations

from bench import batch_bench


async def test_a_small_batch_runs_exactly_once_with_its_baseline(redis_url: str) -> None:
    args = batch_bench.parser().parse_args(
        ["--items", "50", "--baseline-items", "20", "--concurrency", "4", "--timeout", "60"]
    )
    results = await batch_bench.measure(redis_url, args)
    assert results.problems == []
    batch = results.batch
    assert batch.items == 50 and batch.per_second > 0 and not batch.timed_out
    assert sorted(batch.by_custom_id) == sorted(f"item-{n}" for n in range(50))
    assert batch.final is not None and batch.final.counts.total == 50
    assert results.chats is not None and results.chats.chats == 20 and results.ratio > 0
    assert results.memory.peak > 0 and results.memory.rss_before > 0
    assert results.memory.redis_after > 0


def test_the_checks_catch_missing_and_repeated_results() -> None:
    run = batch_bench.BatchRun(3)
    run.by_custom_id.update(["a", "a"])
    run.sequences = [1, 2]
    problems = run.problems(["a", "b", "c"])
    assert any("without a result" in p for p in problems)
    assert any("several results" in p for p in problems)
    assert "no final batch read" in problems

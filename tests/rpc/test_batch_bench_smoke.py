"""The batch benchmark runs end to end (tiny sizes: this checks it works, not speed)."""

from __future__ import annotations

from typing import Any

from bench import batch_bench


async def test_a_small_batch_runs_exactly_once_with_its_baseline(redis_url: str) -> None:
    args = batch_bench.parser().parse_args(
        [
            *("--items", "50", "--baseline-items", "20", "--concurrency", "4"),
            *("--timeout", "60", "--deltas", "1"),
        ]
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


def test_the_targets_compare_with_the_baseline_of_the_same_run() -> None:
    def results(batch_s: float, batch_cpu_s: float, chats_s: float, chat_cpu_s: float) -> Any:
        batch = batch_bench.BatchRun(100, seconds=batch_s)
        chats = batch_bench.ChatsRun(100, chats_s, 0, server_cpu_s=chat_cpu_s)
        cpu = {"orchestrator": batch_cpu_s, "workers": 0.0, "reference": 0.0}
        return batch_bench.Results(16, 0, batch, None, cpu, chats, [], None)  # type: ignore[arg-type]

    assert results(1.0, 0.4, 2.0, 1.0).verdicts() == {"items/s": True, "CPU per item": True}
    # As before issue 16: 0.85 the rate, 0.89 the CPU.
    before = results(1.0, 0.89, 0.85, 1.0)
    assert before.verdicts() == {"items/s": False, "CPU per item": False}
    assert results(1.0, 0.4, 1.0, 1.0).verdicts() == {"items/s": False, "CPU per item": True}
    no_baseline = results(1.0, 0.4, 1.0, 1.0)
    no_baseline.chats = None
    assert no_baseline.verdicts() == {}

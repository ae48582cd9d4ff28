"""The flow benchmark runs end to end (tiny sizes: this checks it works, not speed)."""

from __future__ import annotations

import pytest

from bench import flow_bench
from bench.tables import median_run


async def test_chats_run_on_the_bare_relay() -> None:
    result = await flow_bench.chats_on_relay(chats=20, concurrency=4, sessions=8, deltas=2)
    assert result.chats == 20 and result.per_second > 0 and result.p99_ms >= result.p50_ms


async def test_chats_run_on_the_orchestrator(redis_url: str) -> None:
    result = await flow_bench.chats_on_orchestrator(
        redis_url, chats=20, concurrency=4, sessions=8, deltas=2
    )
    assert result.chats == 20 and result.per_second > 0 and result.p99_ms >= result.p50_ms


async def test_fanout_and_idle_streams_on_a_child_orchestrator(redis_url: str) -> None:
    fan = await flow_bench.fanout(
        redis_url, sessions=4, per_session=3, notices=40, publishers=2, paced_s=0.3
    )
    assert fan.streams == 12 and fan.delivered == 120 and fan.per_second > 0
    assert fan.paced_delivered > 0 and fan.p99_ms >= fan.p50_ms > 0
    idle = await flow_bench.idle_streams(redis_url, sessions=4, per_session=3, idle_s=0.2)
    assert idle.streams == 12 and idle.rss_after > 0 and idle.cpu_s >= 0


async def test_fanout_runs_with_more_publishers_than_sessions(redis_url: str) -> None:
    fan = await flow_bench.fanout(
        redis_url, sessions=2, per_session=2, notices=20, publishers=8, paced_s=0.2
    )
    assert fan.streams == 4 and fan.delivered == 40


async def test_chat_rounds_run_both_paths_in_each_round(redis_url: str) -> None:
    rounds = await flow_bench.chat_rounds(
        redis_url, chats=24, rounds=3, concurrency=4, sessions=8, deltas=2
    )
    assert [run.chats for run in rounds.relay] == [8, 8, 8]
    assert [run.chats for run in rounds.orchestrator] == [8, 8, 8]
    assert all(run.redis_cpu_ms > 0 for run in rounds.orchestrator)
    assert len(rounds.ratios()) == len(rounds.cpu_ratios()) == 3


def test_the_chat_verdict_is_the_median_of_the_rounds_ratios() -> None:
    def run(per_second: float) -> flow_bench.ChatResult:
        return flow_bench.ChatResult(
            "path", 100, 100 / per_second, 1.0, 2.0, cpu_ms=1000 / per_second
        )

    rounds = flow_bench.ChatRounds(
        relay=[run(100), run(200), run(100)], orchestrator=[run(40), run(120), run(50)]
    )
    assert rounds.ratios() == pytest.approx([0.4, 0.6, 0.5])
    assert rounds.ratio == pytest.approx(0.5)
    assert rounds.cpu_ratio == pytest.approx(0.5)
    assert median_run(rounds.orchestrator).per_second == pytest.approx(50)

"""The flow benchmark runs end to end (tiny sizes: this checks it works, not speed)."""

from __future__ import annotations

from bench import flow_bench


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

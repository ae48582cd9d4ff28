"""The plan benchmark runs end to end (tiny sizes: this checks it works, not speed)."""

from __future__ import annotations

from bench import plan_bench


async def test_both_shapes_run_on_the_relay_and_the_orchestrator(redis_url: str) -> None:
    args = plan_bench.parser().parse_args(
        ["--chats", "12", "--rounds", "2", "--concurrency", "3", "--sessions", "4"]
    )
    results = await plan_bench.measure(redis_url, args)
    assert [c.relay.shape for c in results.comparisons] == ["tool_agent", "llm"]
    for comparison in results.comparisons:
        assert comparison.ratio > 0
        for figures in (comparison.relay, comparison.orchestrator):
            assert figures.rounds == 2 and figures.chats == 24 and figures.per_second > 0
            assert figures.p99_ms >= figures.p50_ms > 0
            assert figures.cpu_ms_per_chat >= 0
            # accepted, at least one delta, the final event
            assert figures.events_per_chat >= 3
    tool_relay = results.comparisons[0].relay
    # calculator and clock, each started then finished
    assert tool_relay.tool_calls_per_chat == 4
    assert results.comparisons[0].orchestrator.redis_cpu_ms_per_chat >= 0

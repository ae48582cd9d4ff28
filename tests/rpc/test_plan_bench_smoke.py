"""The plan benchmark runs end to end (tiny sizes: this checks it works, not speed)."""

from __future__ import annotations

from bench import plan_bench


async def test_both_shapes_run_on_the_relay_and_the_orchestrator(redis_url: str) -> None:
    args = plan_bench.parser().parse_args(
        ["--chats", "12", "--rounds", "2", "--concurrency", "3", "--sessions", "4"]
    )
    results = await plan_bench.measure(redis_url, args)
    variants = plan_bench.orchestrator_variants()
    sides = [plan_bench.RELAY, *(name for name, _ in variants)]
    assert [(row.figures.shape, row.figures.side) for row in results.rows] == [
        (shape.name, side) for shape in plan_bench.SHAPES for side in sides
    ]
    for row in results.rows:
        f = row.figures
        assert f.rounds == 2 and f.chats == 24 and f.per_second > 0
        assert f.p99_ms >= f.p50_ms > 0 and f.cpu_ms_per_chat >= 0
        # accepted, at least one delta, the final event
        assert f.events_per_chat >= 3
        assert (row.ratio is None) == (f.side == plan_bench.RELAY)
        assert row.ratio is None or (row.ratio > 0 and f.redis_cpu_ms_per_chat >= 0)
    tool_agent = {row.figures.side: row.figures for row in results.rows[: len(sides)]}
    # calculator and clock, each started then finished
    assert tool_agent[plan_bench.RELAY].tool_calls_per_chat == 4
    for name, plans in variants:
        if plans:
            assert tool_agent[name].tool_calls_per_chat == 4
    assert set(results.verdicts()) == {
        f"{shape.name}, {name}" for shape in plan_bench.SHAPES for name, _ in variants
    }

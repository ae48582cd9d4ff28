"""The soak runs end to end (tiny sizes: this checks it works, not what it measures)."""

from __future__ import annotations

import secrets
from pathlib import Path

from bench import soak
from bench.processes import wait_serving
from tests.support.redis_process import free_port


async def test_a_tiny_soak_samples_the_server_and_reports_its_growth(redis_url: str) -> None:
    args = soak.parse_args(
        [
            "--streams", "6", "--rate", "8", "--duration", "4", "--warm-up", "1",
            "--sample-interval", "0.2", "--lanes", "3", "--chats-per-session", "2",
        ]
    )  # fmt: skip
    results = await soak.measure(redis_url, args)
    assert results.problems() == []
    assert results.sent == 32 and results.outcomes["completed"] == 32
    assert results.streams_open_at_end == 6
    assert results.rss_start > 0 and results.rss_end > 0 and results.reference_end > 0
    assert results.redis_end > 0
    assert results.growth.chats > 0


async def test_orchestrator_serve_with_tracemalloc_writes_a_report_on_each_sigusr1(
    redis_url: str, tmp_path: Path
) -> None:
    report = tmp_path / "tracemalloc.txt"
    port = free_port()
    admin_key = f"ao_soakadmin_{secrets.token_urlsafe(32)}"
    with soak.start_server(
        redis_url, port, "127.0.0.1:1", admin_key, streams=1, tracemalloc_file=str(report)
    ) as server:
        await wait_serving(server, f"127.0.0.1:{port}")
        await soak.final_report(server, report, timeout_s=60)
        await soak.final_report(server, report, timeout_s=60)
    text = report.read_text()
    assert text.count("=== report ") == 2
    assert "--- growth since report 0, by traceback (largest first)" in text
    assert "--- gc objects by type, change since report 0" in text


def test_growth_is_the_least_squares_slope_and_levels_off_when_the_last_third_is_flat() -> None:
    rising = [soak.Sample(float(n), 10 * n, 1000 + 512 * 10 * n, 0) for n in range(30)]
    growth = soak.Growth(rising)
    assert growth.chats == 290
    assert round(growth.per_chat) == 512
    assert growth.thirds() == (512.0, 512.0) and not growth.levelled_off

    flat_end = [soak.Sample(float(n), 10 * n, 1000 + 512 * 10 * min(n, 15), 0) for n in range(30)]
    first, last = soak.Growth(flat_end).thirds()
    assert first == 512.0 and last == 0.0
    assert soak.Growth(flat_end).levelled_off


def test_the_slope_of_points_that_do_not_vary_in_x_is_zero() -> None:
    assert soak.least_squares_slope([(1.0, 5.0), (1.0, 9.0)]) == 0.0
    assert soak.least_squares_slope([(0.0, 0.0), (2.0, 1.0), (4.0, 2.0)]) == 0.5


def test_the_samples_file_has_one_row_per_sample(tmp_path: Path) -> None:
    path = tmp_path / "samples.csv"
    soak.write_samples(path, [soak.Sample(0.5, 3, 1024, 2048), soak.Sample(1.0, 7, 4096, 2048)])
    assert path.read_text().splitlines() == [
        "seconds,chats,rss_bytes,reference_rss_bytes",
        "0.50,3,1024,2048",
        "1.00,7,4096,2048",
    ]

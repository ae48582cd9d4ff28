"""``orchestrator serve --tracemalloc FILE``: the reports name what grew since the first one."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.memory_probe import MemoryProbe


class Leaked:
    """Objects the test keeps alive between two reports, as a leak would."""

    def __init__(self, n: int) -> None:
        self.payload = f"leaked payload {n:08d}" * 4


@pytest.fixture
def probe(tmp_path: Path) -> Iterator[MemoryProbe]:
    was_tracing = tracemalloc.is_tracing()
    probe = MemoryProbe(tmp_path / "memory.txt")
    probe.start()
    yield probe
    if not was_tracing:
        tracemalloc.stop()


def test_a_structure_that_grows_between_reports_tops_the_second_report(
    probe: MemoryProbe,
) -> None:
    probe.report("warm")
    kept = [Leaked(n) for n in range(5_000)]
    probe.report("later")
    text = probe.path.read_text()
    first, second = text.split("=== report 1 ")
    assert first.startswith("=== report 0 (warm)") and "largest by line" in first
    by_line = second.split("--- growth since report 0, by line (largest first)\n")[1].splitlines()
    assert "test_memory_probe.py" in by_line[0]  # the line that kept the payloads
    by_type = second.split("--- gc objects by type, change since report 0\n")[1].splitlines()
    assert any(line.split()[0] == "+5,000" and "Leaked" in line for line in by_type)
    assert len(kept) == 5_000

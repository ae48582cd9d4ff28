"""server.gc_tuning: the serving process' collector, settled after start-up (each case in a
fresh interpreter: freezing is process-wide and cannot be undone for the test process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import gc, sys
from server.gc_tuning import settle_heap
default = gc.get_threshold()
settle_heap(int(sys.argv[1]))
print(gc.get_threshold()[0], gc.get_freeze_count(), default[1:] == gc.get_threshold()[1:])
"""


def _settled(threshold: int) -> tuple[int, int, bool]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(threshold)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    return int(out[0]), int(out[1]), out[2] == "True"


def test_settling_freezes_the_start_up_heap_and_raises_the_young_threshold() -> None:
    young, frozen, older_kept = _settled(50_000)
    assert young == 50_000
    assert frozen > 1_000  # the modules' objects: never walked by a collection again
    assert older_kept


def test_zero_leaves_the_collector_as_python_sets_it() -> None:
    young, frozen, older_kept = _settled(0)
    assert young == 700
    assert frozen == 0
    assert older_kept

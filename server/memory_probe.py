"""A diagnostic switch for memory growth: ``orchestrator serve --tracemalloc FILE``.

It starts ``tracemalloc`` before the server is built and, on SIGUSR1 (and every
``--tracemalloc-interval`` seconds when set), appends a report to FILE: what is traced now, the
biggest differences against the first report by source line and by traceback, and the counts of
live objects by type (``gc``) against the first report. Send the first SIGUSR1 when the process
has warmed up, the next ones later: a structure that grows without bound shows up at the top of
every later report. Tracing slows the process down and costs memory of its own: a diagnostic,
never for production. A report is written in a thread; the server goes on, slower, meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import linecache
import logging
import signal
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)

TRACEBACK_FRAMES = 12
TOP = 20
# Not the service's: the snapshots the probe keeps (allocated under tracemalloc.py) and the
# source lines it reads to format tracebacks (linecache).
_IGNORED = (
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, linecache.__file__),
)


def rss_kib() -> int:
    """This process' resident set size (/proc/self/status VmRSS), in KiB; 0 if unknown."""
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _largest_growth(
    diffs: list[tracemalloc.StatisticDiff], top: int
) -> list[tracemalloc.StatisticDiff]:
    return sorted(diffs, key=lambda d: d.size_diff, reverse=True)[:top]


def count_objects() -> collections.Counter[str]:
    """Live objects tracked by the garbage collector, by type name: those created since the
    server froze its start-up heap (server.gc_tuning; gc.get_objects() leaves frozen ones out)."""
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


class MemoryProbe:
    """Writes tracemalloc and gc reports to a file; ``report()`` writes one."""

    def __init__(self, path: Path, *, top: int = TOP) -> None:
        self.path = path
        self.top = top
        self.reports = 0
        self._first: tracemalloc.Snapshot | None = None
        self._first_counts: collections.Counter[str] = collections.Counter()
        self._started = time.monotonic()

    def start(self) -> None:
        if not tracemalloc.is_tracing():
            tracemalloc.start(TRACEBACK_FRAMES)

    def report(self, reason: str) -> None:
        gc.collect()
        snapshot = tracemalloc.take_snapshot().filter_traces(_IGNORED)
        counts = count_objects()
        current, peak = tracemalloc.get_traced_memory()
        with self.path.open("a") as out:
            out.write(
                f"=== report {self.reports} ({reason}) at {time.monotonic() - self._started:.1f} s:"
                f" traced {current / 1024:,.0f} KiB (peak {peak / 1024:,.0f} KiB),"
                f" RSS {rss_kib():,} KiB, {sum(counts.values()):,} gc objects"
                f" (+{gc.get_freeze_count():,} frozen at start-up, not counted by type)\n"
            )
            if self._first is None:
                self._write_top(out, snapshot)
                self._first, self._first_counts = snapshot, counts
            else:
                self._write_diff(out, snapshot, counts)
        self.reports += 1

    def _write_top(self, out: TextIO, snapshot: tracemalloc.Snapshot) -> None:
        out.write("--- largest by line (the baseline of later reports)\n")
        for stat in snapshot.statistics("lineno")[: self.top]:
            out.write(f"{stat}\n")

    def _write_diff(
        self,
        out: TextIO,
        snapshot: tracemalloc.Snapshot,
        counts: collections.Counter[str],
    ) -> None:
        assert self._first is not None
        out.write("--- growth since report 0, by line (largest first)\n")
        for diff in _largest_growth(snapshot.compare_to(self._first, "lineno"), self.top):
            out.write(f"{diff}\n")
        out.write("--- growth since report 0, by traceback (largest first)\n")
        by_traceback = snapshot.compare_to(self._first, "traceback")
        for diff in _largest_growth(by_traceback, self.top // 2):
            out.write(
                f"{diff.size_diff / 1024:+,.1f} KiB, {diff.count_diff:+,} blocks"
                f" (now {diff.size / 1024:,.1f} KiB in {diff.count:,} blocks)\n"
            )
            for line in diff.traceback.format(most_recent_first=True):
                out.write(f"    {line}\n")
        out.write("--- gc objects by type, change since report 0\n")
        changes = {name: counts[name] - self._first_counts[name] for name in counts}
        changes.update({n: -c for n, c in self._first_counts.items() if n not in counts})
        for name, change in sorted(changes.items(), key=lambda kv: -abs(kv[1]))[: self.top]:
            out.write(f"{change:+10,}  {name} (now {counts[name]:,})\n")


@contextlib.asynccontextmanager
async def probing(probe: MemoryProbe | None, interval_s: float) -> AsyncIterator[None]:
    """Report on SIGUSR1 and, when ``interval_s`` > 0, at that interval, while the body runs."""
    if probe is None:
        yield
        return
    loop = asyncio.get_running_loop()
    one_at_a_time = asyncio.Lock()
    tasks: set[asyncio.Task[None]] = set()

    async def report(reason: str) -> None:
        # In a thread: the event loop keeps serving (slowly) while the snapshot is compared.
        async with one_at_a_time:
            await asyncio.to_thread(probe.report, reason)
        log.warning("memory probe: report %d written to %s", probe.reports - 1, probe.path)

    def on_signal() -> None:
        task = loop.create_task(report("SIGUSR1"))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def every_interval() -> None:
        while True:
            await asyncio.sleep(interval_s)
            await report(f"every {interval_s:g} s")

    loop.add_signal_handler(signal.SIGUSR1, on_signal)
    if interval_s > 0:
        tasks.add(loop.create_task(every_interval()))
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

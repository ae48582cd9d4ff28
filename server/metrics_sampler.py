"""Samples the registry-wide gauges into a server's Metrics: unfinished tasks by state
(``orchestrator_tasks``) and work queue items by state (``orchestrator_queue_depth``).

Both come from the registry (JobStore.count_unfinished, WorkQueue.stats), not from what this
process saw, so on Redis every replica reports the same cluster-wide numbers (aggregate them
with max, not sum). The sampler runs every ``interval_s``; while the backend is unreachable the
gauges keep their last sampled values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

from domain.errors import Unavailable
from domain.ports.jobs import JobStore
from domain.ports.queue import QueueStats, WorkQueue
from server.metrics import Metrics

log = logging.getLogger(__name__)


def queue_states(stats: QueueStats) -> dict[str, int]:
    """The ``state`` label values of a queue's depth and their counts."""
    return {
        "ready": stats.ready,
        "leased": stats.leased,
        "delayed": stats.delayed,
        "dead": stats.dead,
    }


class MetricsSampler:
    """Sets the tasks and queue-depth gauges of ``metrics`` from the registry, periodically."""

    def __init__(
        self,
        metrics: Metrics,
        jobs: JobStore,
        queues: Mapping[str, WorkQueue],
        *,
        interval_s: float,
    ) -> None:
        self._metrics = metrics
        self._jobs = jobs
        self._queues = dict(queues)
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def sample_once(self) -> None:
        """Read every count, then set the gauges (Unavailable when the backend is down)."""
        tasks = await self._jobs.count_unfinished()
        depths = {name: queue_states(await queue.stats()) for name, queue in self._queues.items()}
        for state, n in tasks.items():
            self._metrics.set_tasks(state.value, n)
        for name, states in depths.items():
            for state_name, n in states.items():
                self._metrics.set_queue_depth(name, state_name, n)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="metrics-sampler")

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.sample_once()
            except Unavailable as exc:
                log.debug("metrics sampler skipped a pass: %s", exc)
            except Exception:
                log.exception("metrics sampler pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval_s)

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Let the current pass finish (a cancelled Redis call may be swallowed by the client,
        so stopping is a flag first and a cancel only as the last resort)."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

"""Samples the registry-wide gauges into a server's Metrics: unfinished tasks by state
(``orchestrator_tasks``) and work queue items by state (``orchestrator_queue_depth``).

Both come from the registry (JobStore.count_unfinished, WorkQueue.stats), not from what this
process saw, so on Redis every replica reports the same cluster-wide numbers (aggregate them
with max, not sum). The sampler runs every ``interval_s``; while the backend is unreachable the
gauges keep their last sampled values.
"""

from __future__ import annotations

from collections.abc import Mapping

from domain.periodic import PeriodicTask
from domain.ports.jobs import JobStore
from domain.ports.queue import QueueStats, WorkQueue
from server.metrics import Metrics


def queue_states(stats: QueueStats) -> dict[str, int]:
    """The ``state`` label values of a queue's depth and their counts."""
    return {
        "ready": stats.ready,
        "leased": stats.leased,
        "delayed": stats.delayed,
        "dead": stats.dead,
    }


class MetricsSampler(PeriodicTask):
    """Sets the tasks and queue-depth gauges of ``metrics`` from the registry, periodically
    (domain.periodic runs the loop)."""

    def __init__(
        self,
        metrics: Metrics,
        jobs: JobStore,
        queues: Mapping[str, WorkQueue],
        *,
        interval_s: float,
    ) -> None:
        super().__init__("metrics-sampler", self.sample_once, interval_s)
        self._metrics = metrics
        self._jobs = jobs
        self._queues = dict(queues)

    async def sample_once(self) -> None:
        """Read every count, then set the gauges (Unavailable when the backend is down)."""
        tasks = await self._jobs.count_unfinished()
        depths = {name: queue_states(await queue.stats()) for name, queue in self._queues.items()}
        for state, n in tasks.items():
            self._metrics.set_tasks(state.value, n)
        for name, states in depths.items():
            for state_name, n in states.items():
                self._metrics.set_queue_depth(name, state_name, n)

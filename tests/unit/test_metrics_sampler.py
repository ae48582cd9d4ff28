"""The metrics sampler over the in-memory stores: what one pass sets, and that a pass the
backend refuses leaves the last values in place without stopping the sampler."""

from __future__ import annotations

import asyncio

from domain.errors import Unavailable
from domain.jobs import JobState
from domain.ports.queue import NewWorkItem
from registry.memory_jobs import MemoryEventLog, MemoryJobStore
from registry.memory_queue import MemoryWorkQueue
from registry.memory_sessions import MemorySessionStore
from server.metrics import Metrics
from server.metrics_sampler import MetricsSampler


class OutageJobStore(MemoryJobStore):
    """A memory job store whose counting can be made to fail; reports every count attempt."""

    def __init__(self) -> None:
        events = MemoryEventLog(max_events=10, ttl_ms=60_000)
        super().__init__(MemorySessionStore(retention_ms=60_000), events)
        self.down = False
        self.passes: asyncio.Queue[str] = asyncio.Queue()

    async def count_unfinished(self) -> dict[JobState, int]:
        if self.down:
            self.passes.put_nowait("refused")
            raise Unavailable("backend down")
        counts = await super().count_unfinished()
        self.passes.put_nowait("counted")
        return counts


def gauge(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def item(item_id: str) -> NewWorkItem:
    return NewWorkItem(item_id=item_id, tenant_id="acme", kind="test", payload=b"")


async def test_one_pass_sets_every_task_state_and_every_queue_state() -> None:
    metrics = Metrics()
    queue = MemoryWorkQueue()
    await queue.enqueue([item("i1"), item("i2")])
    sampler = MetricsSampler(metrics, OutageJobStore(), {"batch": queue}, interval_s=60)

    await sampler.sample_once()

    assert gauge(metrics, "orchestrator_tasks", state="pending") == 0
    assert gauge(metrics, "orchestrator_tasks", state="running") == 0
    depth = {
        state: gauge(metrics, "orchestrator_queue_depth", queue="batch", state=state)
        for state in ("ready", "leased", "delayed", "dead")
    }
    assert depth == {"ready": 2, "leased": 0, "delayed": 0, "dead": 0}


async def next_pass(jobs: OutageJobStore, outcome: str) -> None:
    """Wait for the sampler's next pass with ``outcome`` (counted or refused)."""

    async def wait() -> None:
        while await jobs.passes.get() != outcome:
            pass

    await asyncio.wait_for(wait(), 5)


async def test_a_refused_pass_keeps_the_last_values_and_the_sampler_running() -> None:
    metrics = Metrics()
    jobs = OutageJobStore()
    queue = MemoryWorkQueue()
    sampler = MetricsSampler(metrics, jobs, {"batch": queue}, interval_s=0.01)
    sampler.start()
    try:
        await next_pass(jobs, "counted")
        jobs.down = True
        await next_pass(jobs, "refused")  # passes run one at a time: the counted one is over
        await queue.enqueue([item("i1")])
        await next_pass(jobs, "refused")
        assert gauge(metrics, "orchestrator_queue_depth", queue="batch", state="ready") == 0

        jobs.down = False
        await next_pass(jobs, "counted")
        await sampler.stop()  # lets the pass that counted set its gauges
        assert gauge(metrics, "orchestrator_queue_depth", queue="batch", state="ready") == 1
    finally:
        await sampler.stop()

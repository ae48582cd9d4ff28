"""Settling batch items that a Redis Cluster failover left RUNNING for ever (ADR 0016).

A worker records an item's result in the batch (the tenant's slot) and then completes the item
on the work queue (the slot of the tenant's queue shard, often on another master). When a
master dies before its replica got the result, the replica that takes over has the item
RUNNING while the queue, on a surviving master, has it finished: no delivery will ever come
again, and the batch would stay in progress until its window ends.

After each failover the server's health probe sees, one pass looks at every RUNNING item of
every batch on the expiry schedule whose work queue item has finished, and records the final
event its job keeps (batch items keep theirs): the result the lost write held. An item whose
job is gone too, or not final, fails ``lost_in_failover`` (retryable). Every step is a
compare-and-set, so passes in several processes give each item one result.
"""

from __future__ import annotations

import logging

from domain.batch_models import ItemOutcome, ItemState, item_queue_id
from domain.batch_runner import item_job_id, outcome_of
from domain.periodic import PeriodicTask
from domain.ports.batches import BatchStore
from domain.ports.jobs import JobStore
from domain.ports.queue import WorkQueue

log = logging.getLogger(__name__)

# Batches looked at per pass at most.
MAX_BATCHES = 10_000
# How soon a requested pass runs, and a pass that met an outage (the cluster still settling)
# is tried again.
INTERVAL_S = 1.0


def lost_outcome(job_id: str) -> ItemOutcome:
    """What an item whose result and job a failover both lost ends with."""
    error = {
        "code": "lost_in_failover",
        "message": "the item's result was lost in a Redis failover; submit it again",
        "retryable": True,
    }
    return ItemOutcome(ItemState.FAILED, job_id, error=error)


class BatchRepair(PeriodicTask):
    """Runs a repair pass once requested (``request``: after a failover), at the loop's next
    turn, and again every ``interval_s`` until one finishes (domain.periodic runs the loop and
    logs its failures)."""

    def __init__(
        self,
        store: BatchStore,
        queue: WorkQueue,
        jobs: JobStore,
        *,
        interval_s: float = INTERVAL_S,
    ) -> None:
        super().__init__("batch-repair", self._requested_pass, interval_s)
        self._store = store
        self._queue = queue
        self._jobs = jobs
        self._requested = False
        self.settled = 0  # items settled so far (for tests and operators)
        self.passes = 0  # passes finished so far

    def request(self) -> None:
        """Run a pass at the loop's next turn (one asked for during a pass runs after it)."""
        self._requested = True

    async def _requested_pass(self) -> None:
        if not self._requested:
            return
        self._requested = False
        try:
            self.settled += await self.repair_once()
        except Exception:
            self._requested = True  # tried again at the next turn
            raise
        self.passes += 1

    async def repair_once(self) -> int:
        """One pass; returns how many items it settled."""
        settled = 0
        for tenant_id, batch_id in await self._store.scheduled_batches(limit=MAX_BATCHES):
            for index in await self._store.running_items(tenant_id, batch_id):
                if await self._queue.get_result(item_queue_id(batch_id, index)) is None:
                    continue  # not finished on the queue: a delivery will record its result
                outcome = await self._outcome(tenant_id, batch_id, index)
                sequence = await self._store.finish_item(tenant_id, batch_id, index, outcome)
                if sequence is not None:
                    settled += 1
                    log.warning(
                        "batch %s item %d: its result was lost in a failover while the work "
                        "queue had it finished; recorded %s from its job",
                        batch_id,
                        index,
                        outcome.state.value,
                    )
        return settled

    async def _outcome(self, tenant_id: str, batch_id: str, index: int) -> ItemOutcome:
        job_id = item_job_id(batch_id, index)
        job = await self._jobs.get_job(tenant_id, job_id)
        if job is None or not job.state.is_final or job.final_event is None:
            return lost_outcome(job_id)
        return outcome_of(job.final_event)

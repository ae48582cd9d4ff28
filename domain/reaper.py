"""The reaper: marks jobs past their deadline timed_out. Every server process runs one; the
registry makes each transition exactly once, so running several is safe."""

from __future__ import annotations

import logging

from domain.jobs import JobLimits, SessionEvent
from domain.periodic import PeriodicTask
from domain.ports.jobs import JobStore

log = logging.getLogger(__name__)

REAP_BATCH = 200


class JobReaper(PeriodicTask):
    """Reaps every ``interval_s`` (domain.periodic runs the loop)."""

    def __init__(self, jobs: JobStore, limits: JobLimits, *, interval_s: float) -> None:
        super().__init__("job-reaper", self.reap_once, interval_s)
        self._jobs = jobs
        self._limits = limits

    async def reap_once(self) -> list[SessionEvent]:
        """One pass; returns the timed_out events it published."""
        reaped: list[SessionEvent] = []
        while True:
            events = await self._jobs.reap_expired(self._limits, limit=REAP_BATCH)
            reaped.extend(events)
            if len(events) < REAP_BATCH:
                break
        for event in reaped:
            log.info("job %s timed out (session %s)", event.job_id, event.session_id)
        return reaped

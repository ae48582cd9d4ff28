"""The reaper: marks jobs past their deadline timed_out. Every server process runs one; the
registry makes each transition exactly once, so running several is safe."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from domain.errors import Unavailable
from domain.jobs import JobLimits, SessionEvent
from registry.base import JobStore

log = logging.getLogger(__name__)

REAP_BATCH = 200


class JobReaper:
    def __init__(self, jobs: JobStore, limits: JobLimits, *, interval_s: float) -> None:
        self._jobs = jobs
        self._limits = limits
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

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

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="job-reaper")

    async def _run(self) -> None:
        while True:
            try:
                await self.reap_once()
            except Unavailable as exc:
                log.debug("reaper skipped a pass: %s", exc)
            except Exception:
                log.exception("reaper pass failed")
            await asyncio.sleep(self._interval_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

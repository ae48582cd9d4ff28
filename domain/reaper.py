"""The reaper: marks jobs past their deadline timed_out. Every server process runs one; the
registry makes each transition exactly once, so running several is safe."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from domain.errors import Unavailable
from domain.jobs import JobLimits, SessionEvent
from domain.ports.jobs import JobStore

log = logging.getLogger(__name__)

REAP_BATCH = 200


class JobReaper:
    def __init__(self, jobs: JobStore, limits: JobLimits, *, interval_s: float) -> None:
        self._jobs = jobs
        self._limits = limits
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

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
        while not self._stopping.is_set():
            try:
                await self.reap_once()
            except Unavailable as exc:
                log.debug("reaper skipped a pass: %s", exc)
            except Exception:
                log.exception("reaper pass failed")
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

"""One background loop for every periodic pass of a process (the reaper, hand-off recovery, batch
expiry, the metrics sampler, the revocation watch, the health monitor): each keeps only its pass.

The loop runs the pass, then waits ``interval_s`` or until stopped. A pass that fails does not
end the loop: a "quiet" error (Unavailable by default: the backend is down, which health already
reports) is logged at DEBUG; any other error is logged once per failure streak (an ERROR with
its traceback for the first failure of a kind, DEBUG for the same kind again, one INFO when a
pass succeeds again), so a broken pass cannot flood the log every ``interval_s``.

Stopping is a flag first: a wait in progress ends at once, a pass in progress may finish (a
cancelled Redis call may be swallowed by the client and come back as a connection error), and
only a pass still running after ``stop_timeout_s`` is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field

from domain.errors import Unavailable

log = logging.getLogger(__name__)

DEFAULT_STOP_TIMEOUT_S = 2.0


@dataclass(eq=False)
class PeriodicTask:
    """Runs ``pass_fn`` every ``interval_s`` in a task named ``name`` (see module doc)."""

    name: str
    pass_fn: Callable[[], Awaitable[object]]
    interval_s: float
    _: KW_ONLY
    quiet: tuple[type[Exception], ...] = (Unavailable,)
    wait_first: bool = False
    stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S
    _stopping: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = field(init=False, default=None)
    # The kind of error of the current failure streak (None: the last pass succeeded).
    _failing: type[Exception] | None = field(init=False, default=None)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the loop (once; a second call while it runs does nothing)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def run_once(self) -> bool:
        """One pass with the loop's error handling; returns whether it succeeded."""
        try:
            await self.pass_fn()
        except self.quiet as exc:
            log.debug("%s skipped a pass: %s", self.name, exc)
            return False
        except Exception as exc:
            self._failed(exc)
            return False
        if self._failing is not None:
            log.info("%s passes again", self.name)
            self._failing = None
        return True

    def _failed(self, exc: Exception) -> None:
        if type(exc) is self._failing:
            log.debug("%s pass failed again: %s: %s", self.name, type(exc).__name__, exc)
            return
        self._failing = type(exc)
        log.error(
            "%s pass failed (logged once until it passes or fails otherwise)",
            self.name,
            exc_info=exc,
        )

    async def _run(self) -> None:
        if self.wait_first and await self._wait():
            return
        while not self._stopping.is_set():
            await self.run_once()
            if await self._wait():
                return

    async def _wait(self) -> bool:
        """Wait ``interval_s`` or until stopped; returns whether stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), self.interval_s)
        return self._stopping.is_set()

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop the loop: let a pass in progress finish for up to ``timeout_s`` (default
        ``stop_timeout_s``), then cancel it."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is None:
            return
        bound = self.stop_timeout_s if timeout_s is None else timeout_s
        try:
            await asyncio.wait_for(asyncio.shield(task), bound)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

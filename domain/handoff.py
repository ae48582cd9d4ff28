"""Hand-off recovery: every process runs one beside the reaper. It claims the PENDING jobs whose
hand-off to their service was interrupted (the process handing one over died, or could not
finish) once their hand-off lease has run out, and hands each over again through the same path
as a new message (ChatOrchestrator.recover_handoffs); a job that has had every attempt fails
``handoff_failed``. The registry makes each claim atomic, so running several is safe."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from domain.chat import ChatOrchestrator
from domain.errors import Unavailable

log = logging.getLogger(__name__)

CLAIM_BATCH = 100


class HandoffRecovery:
    def __init__(self, chat: ChatOrchestrator, *, interval_s: float) -> None:
        self._chat = chat
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def recover_once(self) -> int:
        """One pass; returns how many jobs it claimed."""
        claimed = 0
        while True:
            claims = await self._chat.recover_handoffs(limit=CLAIM_BATCH)
            claimed += len(claims)
            if len(claims) < CLAIM_BATCH:
                return claimed

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="handoff-recovery")

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.recover_once()
            except Unavailable as exc:
                log.debug("hand-off recovery skipped a pass: %s", exc)
            except Exception:
                log.exception("hand-off recovery pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval_s)

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Let the current pass finish, then stop (a cancel only as the last resort)."""
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

"""Hand-off recovery: every process runs one beside the reaper. It claims the PENDING jobs whose
hand-off to their service was interrupted (the process handing one over died, or could not
finish) once their hand-off lease has run out, and hands each over again through the same path
as a new message (ChatOrchestrator.recover_handoffs); a job that has had every attempt fails
``handoff_failed``. The registry makes each claim atomic, so running several is safe."""

from __future__ import annotations

from domain.chat import ChatOrchestrator
from domain.periodic import PeriodicTask

CLAIM_BATCH = 100


class HandoffRecovery(PeriodicTask):
    """Claims and hands over again every ``interval_s`` (domain.periodic runs the loop)."""

    def __init__(self, chat: ChatOrchestrator, *, interval_s: float) -> None:
        super().__init__("handoff-recovery", self.recover_once, interval_s)
        self._chat = chat

    async def recover_once(self) -> int:
        """One pass; returns how many jobs it claimed."""
        claimed = 0
        while True:
            claims = await self._chat.recover_handoffs(limit=CLAIM_BATCH)
            claimed += len(claims)
            if len(claims) < CLAIM_BATCH:
                return claimed

"""Per-process upkeep of the hand-offs a ChatOrchestrator runs, shared by all of them so that a
hand-off costs no task or timer of its own (docs/adr/0007):

- ``HandoffLeases``: one loop renews the lease of every hand-off in progress for longer than a
  third of the grace (a slow or retrying submit is not taken for an interrupted one);
- ``HandoffConfirmations``: the confirmations of finished hand-offs (``JobStore.handoff_done``)
  are buffered and written together on the next loop iteration, several in one round trip.
  Nobody waits for them: a lost one is harmless (the service's first notice drops the record
  too, and the recovery's claim re-checks the job), and ``flush`` writes the rest at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from domain.errors import Unavailable
from domain.jobs import JobLimits
from domain.ports.jobs import JobStore

log = logging.getLogger(__name__)

T = TypeVar("T")

# Confirmations written per round trip at most.
CONFIRM_BATCH = 256


@dataclass(eq=False)
class _Lease:
    tenant_id: str
    job_id: str
    renewed_at: float


class HandoffLeases:
    """Holds the leases of the hand-offs in progress in this process: ``holding`` runs the
    work in the caller's task; one loop (running while any lease is held) renews those held
    longer than a third of the grace, all in the same pass."""

    def __init__(self, jobs: JobStore, limits: JobLimits) -> None:
        self._jobs = jobs
        self._limits = limits
        self._held: set[_Lease] = set()
        self._renewer: asyncio.Task[None] | None = None
        self.renewals = 0  # leases renewed so far (for tests and metrics)

    @property
    def _renew_after_s(self) -> float:
        return max(self._limits.handoff_grace_ms / 3000, 0.05)

    async def holding(self, tenant_id: str, job_id: str, work: Awaitable[T]) -> T:
        """Await ``work`` while holding the job's hand-off lease."""
        loop = asyncio.get_running_loop()
        lease = _Lease(tenant_id, job_id, loop.time())
        self._held.add(lease)
        if self._renewer is None:
            self._renewer = loop.create_task(self._renew_loop(), name="handoff-lease-renewer")
        try:
            return await work
        finally:
            self._held.discard(lease)

    async def _renew_loop(self) -> None:
        """Every sixth of the grace, renew the leases held for a third of it since their start
        or last renewal (so a lease is renewed at most half a grace after it was set); ends when
        no lease is held."""
        loop = asyncio.get_running_loop()
        try:
            while self._held:
                await asyncio.sleep(self._renew_after_s / 2)
                due_at = loop.time() - self._renew_after_s
                due = [lease for lease in self._held if lease.renewed_at <= due_at]
                if due:
                    await asyncio.gather(*(self._renew(lease) for lease in due))
        finally:
            self._renewer = None

    async def _renew(self, lease: _Lease) -> None:
        lease.renewed_at = asyncio.get_running_loop().time()
        try:
            await self._jobs.renew_handoff(lease.tenant_id, lease.job_id, self._limits)
            self.renewals += 1
        except Unavailable as exc:
            log.info("could not renew the hand-off lease of job %s: %s", lease.job_id, exc)
        except Exception as exc:
            log.warning(
                "could not renew the hand-off lease of job %s: %s: %s",
                lease.job_id,
                type(exc).__name__,
                exc,
            )

    async def aclose(self) -> None:
        """Stop the renewal loop (the leases still held run out; another process redoes them)."""
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer


class HandoffConfirmations:
    """Buffers ``handoff_done`` confirmations and writes them with ``JobStore.handoffs_done``
    on the next loop iteration (the ones added meanwhile go in the next round trip)."""

    def __init__(self, jobs: JobStore) -> None:
        self._jobs = jobs
        self._pending: list[tuple[str, str]] = []
        self._writer: asyncio.Task[None] | None = None

    def add(self, tenant_id: str, job_id: str) -> None:
        """Confirm the job's hand-off soon (nobody waits for it)."""
        self._pending.append((tenant_id, job_id))
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(
                self._write(), name="handoff-confirmations"
            )

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def _write(self) -> None:
        try:
            while self._pending:
                # One loop iteration: the hand-offs finishing in it join this batch.
                await asyncio.sleep(0)
                batch = self._pending[:CONFIRM_BATCH]
                del self._pending[:CONFIRM_BATCH]
                try:
                    await self._jobs.handoffs_done(batch)
                except Unavailable as exc:
                    log.info("could not confirm %d hand-offs: %s", len(batch), exc)
                except Exception as exc:
                    log.warning(
                        "could not confirm %d hand-offs: %s: %s",
                        len(batch),
                        type(exc).__name__,
                        exc,
                    )
        finally:
            self._writer = None

    async def flush(self) -> None:
        """Wait until every confirmation added so far is written (or failed)."""
        while self._writer is not None:
            await asyncio.shield(self._writer)

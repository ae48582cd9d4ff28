"""Per-process upkeep of the hand-offs a ChatOrchestrator runs, shared by all of them so that a
hand-off costs no task or timer of its own (docs/adr/0007):

- ``HandoffLeases``: one loop renews the lease of every hand-off in progress for longer than a
  third of the grace (a slow or retrying submit is not taken for an interrupted one);
- ``HandoffConfirmations``: the confirmations of finished hand-offs (``JobStore.handoff_done``)
  are buffered and written together, several in one round trip, ``delay_s`` after the hand-off
  finished (the next loop iteration with no delay). The service's first notice drops the record
  too (in its own script): a hand-off whose first notice this process applied before then
  (``notice_applied``, called by the notice intake) needs no confirmation of its own, and none
  is written. Nobody waits for them: a lost one is harmless (the recovery's claim re-checks the
  job, at worst it hands the job over once more), and ``flush`` writes the rest at once at
  shutdown."""

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
    ``delay_s`` after they were added (with no delay: on the next loop iteration; the ones
    added meanwhile go in the next round trip), except those a notice made needless
    (``notice_applied``). ``delay_s`` must stay well inside the hand-off lease (ChatOrchestrator
    takes a sixth of the grace: a finished hand-off's lease has at least half of it left)."""

    def __init__(self, jobs: JobStore, *, delay_s: float = 0.0) -> None:
        self._jobs = jobs
        self._delay_s = delay_s
        # Confirmations to write: job id -> (tenant id, when it is due by the loop's clock),
        # in the order added (so due ones come first).
        self._pending: dict[str, tuple[str, float]] = {}
        # The hand-offs in progress in this process (``begin``): job id -> whether a notice of
        # the job was applied meanwhile.
        self._open: dict[str, bool] = {}
        self._writer: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None  # the writer's sleep, when it sleeps
        self._flushing = False
        self.skipped = 0  # confirmations a notice made needless (for tests and metrics)

    def begin(self, job_id: str) -> None:
        """A hand-off of the job starts in this process (``add`` or ``abandon`` ends it)."""
        self._open[job_id] = False

    def abandon(self, job_id: str) -> None:
        """The hand-off did not finish: nothing to confirm (its lease runs out)."""
        self._open.pop(job_id, None)

    def notice_applied(self, job_id: str) -> None:
        """A notice of the job was applied (accepted, or found the job finished): the job's
        hand-off record is gone, so a hand-off of it in progress or finished here needs no
        confirmation. A no-op for any other job."""
        if job_id in self._open:
            self._open[job_id] = True
        elif self._pending.pop(job_id, None) is not None:
            self.skipped += 1

    def add(self, tenant_id: str, job_id: str) -> None:
        """Confirm the job's hand-off soon (nobody waits for it), unless a notice of the job
        was applied since its ``begin``."""
        if self._open.pop(job_id, False):
            self.skipped += 1
            return
        loop = asyncio.get_running_loop()
        self._pending[job_id] = (tenant_id, loop.time() + self._delay_s)
        if self._writer is None:
            self._writer = loop.create_task(self._write(), name="handoff-confirmations")

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _due(self, now: float) -> list[tuple[str, str]]:
        """Up to CONFIRM_BATCH confirmations due at ``now`` (all of them when flushing),
        taken off the buffer."""
        batch: list[tuple[str, str]] = []
        for job_id, (tenant_id, due_at) in self._pending.items():
            if len(batch) >= CONFIRM_BATCH or (due_at > now and not self._flushing):
                break
            batch.append((tenant_id, job_id))
        for _, job_id in batch:
            del self._pending[job_id]
        return batch

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                first_due = next(iter(self._pending.values()))[1]
                wait_s = first_due - loop.time()
                if wait_s > 0 and not self._flushing:
                    await self._sleep(wait_s)
                else:
                    # One loop iteration: the hand-offs finishing in it join this batch.
                    await asyncio.sleep(0)
                batch = self._due(loop.time())
                if not batch:
                    continue
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

    async def _sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or until ``flush`` wakes the writer."""
        loop = asyncio.get_running_loop()
        wake: asyncio.Future[None] = loop.create_future()
        self._wake = wake
        timer = loop.call_later(seconds, _resolve, wake)
        try:
            await wake
        finally:
            timer.cancel()
            self._wake = None

    async def flush(self) -> None:
        """Write every confirmation added so far now (due or not), and wait until they are
        written (or failed)."""
        self._flushing = True
        try:
            while self._writer is not None:
                if self._wake is not None:
                    _resolve(self._wake)
                await asyncio.shield(self._writer)
        finally:
            self._flushing = False


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)

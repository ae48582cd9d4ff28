"""Running a handler over a work queue, whatever the backend.

:class:`QueueWorker` keeps up to ``concurrency`` items in flight: it leases items in batches
(only as many as it has free slots, so it never holds work it cannot start), runs
``handler(item)`` for each, renews every in-flight lease on one timer (a third of the lease;
all of them in one ``queue.renew`` call, one round trip rather than one per item) and records
the outcome: a returned value completes the item, :class:`PermanentError` dead-letters it,
any other exception fails it with a retry (backoff and the delivery limit are the queue's).
A handler that meets an outage (:class:`Unavailable`: Redis, a platform service) gives its
item back uncounted, for a delivery after a backoff of its own: an outage is not the item's
fault, and counting it would spend the item's deliveries on a Redis failover or a service
restart and dead-letter work that was accepted, which must run once the outage is over.

Completions are batched: finished items wait a moment in a buffer that one flusher task hands
to ``queue.complete`` in a single call, so a fast handler costs one round trip per batch, not
per item. An item's task ends when its handler returns, but its slot is freed only by the
flusher once its outcome is recorded, so leases keep being renewed until then (and no
per-item future is needed to wait for the flush).

An item whose lease ran out while its handler still runs here (renewals failed through a Redis
outage longer than the lease) comes back to a consumer once Redis does, maybe to this one: this
worker then does not start the item again beside itself, but hands the new delivery to the
handler already running (its outcome is recorded, and its lease renewed, under the new one).

``stop()`` stops leasing; ``run()`` then lets in-flight items finish for ``grace_s`` and
releases the rest (they are ready again at once, their delivery uncounted), so a rolling restart
loses and delays nothing. A worker that dies without stopping loses nothing either: its leases
expire and other workers reclaim the items.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from domain.errors import Unavailable
from domain.ports.queue import FailOutcome, WorkItem, WorkQueue

log = logging.getLogger(__name__)

Handler = Callable[[WorkItem], Awaitable[bytes]]
# Told when a failed delivery sent its item to the dead letter, so the owner of the work can
# record the failure (a batch item, a queued chat job) instead of leaving it running.
DeadLetterHook = Callable[[WorkItem, str], Awaitable[None]]


class ItemRunner(Protocol):
    """The owner of one queue's work: its ``handle`` and its dead-letter hook."""

    async def handle(self, item: WorkItem) -> bytes: ...

    async def dead_lettered(self, item: WorkItem, error: str) -> None: ...


# After a backend error the worker waits this long before leasing again.
_ERROR_BACKOFF_S = 0.5
# An item whose handler met an outage is given back for this long, doubling on each outage it
# meets in a row here, up to the cap.
_OUTAGE_RETRY_S = 0.5
_OUTAGE_RETRY_CAP_S = 30.0
# Items whose outages in a row are remembered at most (then the count starts afresh).
_OUTAGES_REMEMBERED = 10_000
# What became of a failed delivery, as the worker's warning says it.
_FAIL_OUTCOME_WORDS = {
    FailOutcome.RETRY_SCHEDULED: "it runs again after a backoff",
    FailOutcome.DEAD_LETTERED: "given up on: dead-lettered",
    FailOutcome.IGNORED: "ignored: the item had finished, or another delivery holds it",
}
# Largest number of completions sent in one call.
_COMPLETE_BATCH = 200
# Largest number of leases renewed in one call (one script on Redis: kept short).
_RENEW_BATCH = 500


class PermanentError(Exception):
    """Raised by a handler when retrying cannot help: the item goes to the dead letter now."""


class Deferred(Exception):
    """Raised by a handler when its item cannot run yet (its tenant is at a limit toward a
    service, domain.service_caps): the item goes back to its queue for a delivery
    ``delay_ms`` from now, this one not counted (never failed, never dead-lettered)."""

    def __init__(self, delay_ms: int, reason: str) -> None:
        super().__init__(reason)
        self.delay_ms = delay_ms


@dataclass(slots=True)
class WorkerStats:
    """What a worker did, for logs and tests."""

    leased: int = 0
    completed: int = 0  # results stored
    duplicates: int = 0  # results discarded: the item had already finished elsewhere
    retried: int = 0
    dead_lettered: int = 0
    released: int = 0
    deferred: int = 0  # given back for later (Deferred)
    backed_off: int = 0  # given back for later after their handler met an outage (Unavailable)
    lost_leases: int = 0  # renewals that found the item reclaimed by another consumer
    # Deliveries of an item whose handler was still running here: taken over by that handler.
    adopted: int = 0


def default_consumer_name() -> str:
    """Unique per process: host and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


class QueueWorker:
    """Runs ``handler`` over ``queue`` with bounded concurrency until stopped."""

    def __init__(
        self,
        queue: WorkQueue,
        handler: Handler,
        *,
        concurrency: int = 8,
        lease_s: float = 30.0,
        consumer: str | None = None,
        poll_s: float = 1.0,
        grace_s: float = 10.0,
        on_dead_letter: DeadLetterHook | None = None,
        outage_retry_s: float = _OUTAGE_RETRY_S,
    ) -> None:
        if concurrency < 1 or lease_s <= 0 or poll_s <= 0 or grace_s < 0 or outage_retry_s <= 0:
            raise ValueError("concurrency, lease_s, poll_s and outage_retry_s must be positive")
        self.queue = queue
        self.handler = handler
        self.concurrency = concurrency
        self.lease_ms = max(int(lease_s * 1000), 1)
        self.consumer = consumer or default_consumer_name()
        self.poll_ms = max(int(poll_s * 1000), 1)
        self.grace_s = grace_s
        self.on_dead_letter = on_dead_letter
        self.outage_retry_s = outage_retry_s
        self.stats = WorkerStats()
        # Item id -> the outages its handler met in a row here (for the backoff).
        self._outages: dict[str, int] = {}
        self._stopping = asyncio.Event()
        # Every item holding a slot, by its task: from its lease until its outcome is recorded
        # (a task whose handler returned a value ends before the flusher records it).
        self._inflight: dict[asyncio.Task[None], WorkItem] = {}
        self._slot_free = asyncio.Event()
        # Values waiting for the flusher, and the tasks whose slots they hold, in step.
        self._to_complete: list[tuple[WorkItem, bytes]] = []
        self._to_free: list[asyncio.Task[None]] = []
        self._completions_waiting = asyncio.Event()
        self._run_over = asyncio.Event()  # run() is ending: stop renewing
        self._lost: set[asyncio.Task[None]] = set()  # deliveries whose lease another consumer took

    def stop(self) -> None:
        """Stop leasing new items; ``run`` returns after the grace period at the latest."""
        self._stopping.set()

    async def run(self) -> None:
        """Lease and process items until :meth:`stop`, then drain gracefully."""
        # Kept: asyncio.create_task and current_task look the loop up with a getpid() system call
        # each time, a cost per item.
        self._loop = asyncio.get_running_loop()
        flusher = asyncio.create_task(self._flush_loop(), name="queue-worker-flush")
        renewer = asyncio.create_task(self._renew_loop(), name="queue-worker-renew")
        try:
            await self._lease_loop()
        finally:
            await self._drain()
            # The flag ends the renewer even when the cancel lands inside a Redis call that
            # turns it into a connection error (Unavailable), which the loop survives.
            self._run_over.set()
            renewer.cancel()
            self._stopping.set()
            self._completions_waiting.set()
            await asyncio.gather(flusher, renewer, return_exceptions=True)

    async def _lease_loop(self) -> None:
        while not self._stopping.is_set():
            free = self.concurrency - len(self._inflight)
            if free <= 0:
                self._slot_free.clear()
                await self._wait_or_stop(self._slot_free, None)
                continue
            try:
                items = await self.queue.dequeue(
                    self.consumer, count=free, lease_ms=self.lease_ms, wait_ms=self.poll_ms
                )
            except Unavailable as exc:
                log.warning("work queue unavailable: %s", exc)
                await self._wait_or_stop(None, _ERROR_BACKOFF_S)
                continue
            self.stats.leased += len(items)
            new_task, inflight, process = self._task_maker(), self._inflight, self._process
            for item in items:
                # Only a redelivery can be of an item still running here (a first never is).
                if item.deliveries > 1 and self._adopt(item):
                    continue
                inflight[new_task(process(item), name=f"work-{item.item_id}")] = item

    def _adopt(self, item: WorkItem) -> bool:
        """Whether ``item`` is a new delivery of an item whose handler still runs here (its
        lease ran out meanwhile): that handler takes the delivery over, whose receipt its
        renewals and its outcome use from now on."""
        for task, running in self._inflight.items():
            if running.item_id == item.item_id:
                self._inflight[task] = item
                self._lost.discard(task)
                self.stats.adopted += 1
                log.warning(
                    "work item %s came back while its handler still runs here: not run twice",
                    item.item_id,
                )
                return True
        return False

    def _delivery(self, task: asyncio.Task[None], item: WorkItem) -> WorkItem:
        """The delivery ``task`` holds now: ``item``, or one it took over since (_adopt)."""
        return self._inflight.get(task, item)

    def _task_maker(self) -> Callable[..., asyncio.Task[None]]:
        """What makes an item's task: the Task that ``loop.create_task`` would make, made
        directly. uvloop's create_task builds it without the name (so Python formats a
        ``Task-<n>`` name) and then calls ``set_name``; named in the constructor, a task costs
        ~1.5 us less per item. A loop with a task factory still makes its tasks itself."""
        loop = self._loop
        if loop.get_task_factory() is not None:
            return loop.create_task
        return functools.partial(asyncio.Task, loop=loop)

    async def _wait_or_stop(self, event: asyncio.Event | None, timeout_s: float | None) -> None:
        waits = [asyncio.ensure_future(self._stopping.wait())]
        if event is not None:
            waits.append(asyncio.ensure_future(event.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()

    def _free(self, task: asyncio.Task[None]) -> None:
        if self._inflight.pop(task, None) is not None:
            self._lost.discard(task)
            self._slot_free.set()

    async def _process(self, item: WorkItem) -> None:
        """Run the handler and hand its value to the flusher (which frees the slot once the
        value is recorded), or record the outcome here and free the slot on the way out.
        Freed here rather than by a done callback: one callback less per item."""
        try:
            value = await self.handler(item)
        except BaseException as exc:
            task = self._current_task()
            try:
                await self._handler_failed(self._delivery(task, item), exc)
            except Exception:  # a bug on the way out: say so; the item's lease will expire
                log.exception("work item task failed")
            finally:
                self._free(task)
            return
        if self._outages:
            self._outages.pop(item.item_id, None)
        task = self._current_task()
        # Buffered for the flusher, which records the value and frees the slot.
        self._to_complete.append((self._delivery(task, item), value))
        self._to_free.append(task)
        self._completions_waiting.set()

    def _current_task(self) -> asyncio.Task[None]:
        task = asyncio.current_task(self._loop)
        assert task is not None
        return task

    async def _handler_failed(self, item: WorkItem, exc: BaseException) -> None:
        """Record what the handler's exception ``exc`` means for ``item``; a cancellation is
        raised again once the item is given back."""
        if isinstance(exc, asyncio.CancelledError):
            # Stopped past the grace period: give the item back so another worker starts it now.
            with contextlib.suppress(Unavailable):
                if await asyncio.shield(self.queue.release(item)):
                    self.stats.released += 1
            raise exc
        if isinstance(exc, Deferred):
            if await self._give_back(item, exc.delay_ms):
                self.stats.deferred += 1
        elif isinstance(exc, Unavailable):
            await self._back_off(item, exc)
        elif isinstance(exc, PermanentError):
            self._outages.pop(item.item_id, None)
            await self._fail(item, f"{type(exc).__name__}: {exc}", retry=False)
        elif isinstance(exc, Exception):
            self._outages.pop(item.item_id, None)
            await self._fail(item, f"{type(exc).__name__}: {exc}", retry=True)
        else:  # KeyboardInterrupt, SystemExit and the like: not the item's outcome
            raise exc

    async def _back_off(self, item: WorkItem, exc: Unavailable) -> None:
        """Give an item whose handler met an outage back to its queue, uncounted, for a
        delivery after a backoff that doubles with each outage it meets in a row."""
        in_a_row = self._outages.get(item.item_id, 0)
        if in_a_row == 0 and len(self._outages) >= _OUTAGES_REMEMBERED:
            self._outages.clear()
        self._outages[item.item_id] = in_a_row + 1
        delay_s = min(self.outage_retry_s * 2 ** min(in_a_row, 20), _OUTAGE_RETRY_CAP_S)
        log.warning("work item %s meets an outage; again in %.1f s: %s", item.item_id, delay_s, exc)
        if await self._give_back(item, int(delay_s * 1000)):
            self.stats.backed_off += 1

    async def _give_back(self, item: WorkItem, delay_ms: int) -> bool:
        """Give the delivery back, uncounted, for one ``delay_ms`` from now; False when the
        queue did not take it back (or could not be reached: the lease will expire and the
        item come back)."""
        try:
            return await self.queue.release(item, delay_ms=max(delay_ms, 1))
        except Unavailable as exc:
            log.warning("could not give back %s: %s", item.item_id, exc)
            return False

    async def _fail(self, item: WorkItem, error: str, *, retry: bool) -> None:
        try:
            outcome = await self.queue.fail(item, error, retry=retry)
        except Unavailable as exc:  # the lease will expire and the item come back
            log.warning("could not record failure of %s: %s", item.item_id, exc)
            return
        # Said once per failed delivery: a handler's failures would otherwise show only in
        # the counts (and in the dead letter, once every delivery failed).
        log.warning(
            "work item %s failed on delivery %d: %s; %s",
            item.item_id,
            item.deliveries,
            error,
            _FAIL_OUTCOME_WORDS[outcome],
        )
        if outcome is FailOutcome.RETRY_SCHEDULED:
            self.stats.retried += 1
        elif outcome is FailOutcome.DEAD_LETTERED:
            self.stats.dead_lettered += 1
            if self.on_dead_letter is not None:
                try:
                    await self.on_dead_letter(item, error)
                except Exception:  # the item is dead-lettered either way; say so and go on
                    log.exception("dead-letter hook failed for %s", item.item_id)

    async def _flush_loop(self) -> None:
        """Send buffered completions, one batch per call, until stopped and empty."""
        while True:
            await self._completions_waiting.wait()
            self._completions_waiting.clear()
            while self._to_complete:
                batch = self._to_complete[:_COMPLETE_BATCH]
                tasks = self._to_free[:_COMPLETE_BATCH]
                del self._to_complete[:_COMPLETE_BATCH], self._to_free[:_COMPLETE_BATCH]
                await self._complete_batch(batch, tasks)
            if self._stopping.is_set() and not self._inflight:
                return

    async def _complete_batch(
        self, batch: list[tuple[WorkItem, bytes]], tasks: list[asyncio.Task[None]]
    ) -> None:
        """Record ``batch``, then free the slots its ``tasks`` held."""
        try:
            for attempt in range(3):
                try:
                    stored = await self.queue.complete(batch)
                except Unavailable as exc:
                    log.warning(
                        "could not store %d results (attempt %d): %s", len(batch), attempt, exc
                    )
                    await asyncio.sleep(_ERROR_BACKOFF_S)
                    continue
                kept = sum(stored)
                self.stats.completed += kept
                self.stats.duplicates += len(stored) - kept
                return
            # Give up: leases expire and the items are redelivered; their results stored then.
            self.stats.duplicates += len(batch)
        finally:
            for task in tasks:
                self._free(task)

    async def _renew_loop(self) -> None:
        """Renew every in-flight lease each third of the lease, all in one call per tick (in
        chunks of ``_RENEW_BATCH``, so one script never holds Redis long)."""
        interval = self.lease_ms / 3000.0
        while not self._run_over.is_set():
            await asyncio.sleep(interval)
            lost = self._lost
            todo = [(task, item) for task, item in self._inflight.items() if task not in lost]
            for start in range(0, len(todo), _RENEW_BATCH):
                if self._run_over.is_set():
                    return
                chunk = todo[start : start + _RENEW_BATCH]
                try:
                    renewed = await self.queue.renew([item for _, item in chunk])
                except Unavailable as exc:
                    log.warning("could not renew %d leases: %s", len(chunk), exc)
                    break
                for (task, item), kept in zip(chunk, renewed, strict=True):
                    if kept:
                        continue
                    # Reclaimed meanwhile; the result is still offered (CAS decides). A task
                    # whose handler is done (its outcome being recorded, or recorded: the lease
                    # goes with it), or that took a new delivery over (_adopt), lost nothing.
                    if not task.done() and self._inflight.get(task) is item:
                        self._lost.add(task)
                        self.stats.lost_leases += 1

    async def _drain(self) -> None:
        """Let in-flight items finish for the grace period, then cancel (release) the rest."""
        if not self._inflight:
            return
        tasks = list(self._inflight)
        _, pending = await asyncio.wait(tasks, timeout=self.grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

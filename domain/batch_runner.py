"""Running batch items: the work queue handler of every batch worker (embedded in the server
or ``orchestrator worker`` processes).

An item runs like a chat message, through ChatOrchestrator.run_once: it starts a job on the
item's session (or the batch's internal session), hands it to the downstream service and
follows it to its final event; the item's result is that final event. The store's
compare-and-set gives every item exactly one result, however often the queue delivers it.

The item's job id is derived from (batch id, item index) (item_job_id), so a redelivery (its
worker died, its lease expired) finds the job an earlier delivery started and follows it
instead of running the item again as a second job: a job still PENDING is handed to its service
again (the earlier delivery may have died before the hand-off), a finished one gives its kept
final event at once. Each item thus reaches its service as one job, and its usage counts once.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from domain.batch_models import ItemKind, ItemOutcome, ItemRef, ItemStart, ItemState
from domain.batches import BatchManager
from domain.chat import BATCH_AGENT_ID, ChatMessage, ChatOrchestrator
from domain.coalesced import Coalesced
from domain.dispatch import CallContext
from domain.errors import DomainError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from domain.ids import derived_id
from domain.jobs import EventKind, IfBusy, SessionEvent
from domain.ports.batches import BatchStore
from domain.ports.queue import WorkItem
from domain.ports.tracing import NO_TRACING, AttributeValue, SpanKind, Tracing
from domain.service_caps import OverLimit
from domain.worker import Deferred

log = logging.getLogger(__name__)

DONE = b"done"
# An item on its batch's own session reads the session (sliding its expiry) at most this often
# per process; a batch's session lives its window plus an hour, so this keeps it alive.
TOUCH_EVERY_S = 30.0
_REMEMBERED = 4096  # sessions and batches remembered per runner before starting afresh
SKIPPED = b"skipped"


def item_job_id(batch_id: str, index: int) -> str:
    """The id of the job that runs item ``index`` of the batch, the same on every delivery."""
    return derived_id(batch_id, f"item/{index}")


def outcome_of(event: SessionEvent) -> ItemOutcome:
    """The item outcome a job's final event stands for."""
    data = event.data
    if event.kind is EventKind.COMPLETED:
        return ItemOutcome(
            ItemState.COMPLETED,
            event.job_id,
            result=dict(data.get("result") or {}),
            usage=dict(data.get("usage") or {}),
        )
    if event.kind is EventKind.CANCELLED:
        reason = str(data.get("reason", "cancelled"))
        error = {"code": "cancelled", "message": reason, "retryable": False}
        return ItemOutcome(ItemState.CANCELLED, event.job_id, error=error)
    if event.kind is EventKind.TIMED_OUT:
        error = {"code": "timed_out", "message": "the job timed out", "retryable": True}
        return ItemOutcome(ItemState.FAILED, event.job_id, error=error)
    error = dict(data.get("error") or {"code": "unknown", "message": "", "retryable": False})
    return ItemOutcome(ItemState.FAILED, event.job_id, error=error)


def _refused(exc: DomainError) -> ItemOutcome:
    code = {
        NotFound: "not_found",
        FailedPrecondition: "failed_precondition",
        InvalidArgument: "invalid_argument",
    }.get(type(exc), "error")
    return ItemOutcome(
        ItemState.FAILED, error={"code": code, "message": exc.message, "retryable": False}
    )


class FollowInterrupted(Exception):
    """The session's events stopped before the job's final one while the session is open."""


class BatchRunner:
    """The work queue handler for batch items. Each delivery is a consumer span in the trace
    of the call that submitted the batch; the item's job is accepted (and runs) under it."""

    def __init__(
        self,
        store: BatchStore,
        manager: BatchManager,
        chat: ChatOrchestrator,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self._store = store
        self._manager = manager
        self._chat = chat
        self._tracing = tracing
        # (tenant, batch) -> its own session, for items enqueued without it in the payload.
        self._sessions_of: dict[tuple[str, str], str] = {}
        # A batch's own session -> when an item last read it (monotonic seconds).
        self._touched: dict[str, float] = {}
        # The item steps of items that reach them in the same loop iteration: one round trip.
        self._start_items = Coalesced(store.start_items)
        self._attach_jobs = Coalesced(store.attach_jobs)
        self._finish_items = Coalesced(store.finish_items)

    async def handle(self, item: WorkItem) -> bytes:
        spec: dict[str, Any] = json.loads(item.payload)
        attributes: dict[str, AttributeValue] = {
            "messaging.system": "orchestrator",
            "messaging.operation": "process",
            "messaging.destination.name": "batch",
            "messaging.message.id": item.item_id,
            "orchestrator.deliveries": item.deliveries,
        }
        with self._tracing.job_span(
            "batch process", spec.get("tp"), kind=SpanKind.CONSUMER, attributes=attributes
        ) as traceparent:
            return await self._handle(item, spec, traceparent)

    async def _handle(self, item: WorkItem, spec: dict[str, Any], traceparent: str | None) -> bytes:
        tenant_id, batch_id, index = spec["tenant"], spec["batch"], int(spec["index"])
        # An item found RUNNING is always one an earlier delivery did not finish (the queue
        # holds one delivery at a time): it died, was given back at shutdown or deferred over
        # a limit (neither counted as a delivery), so it may run again.
        ref = ItemRef(tenant_id, batch_id, index)
        started = await self._start_items(ref)
        if not started:
            return SKIPPED  # cancelled, expired or finished elsewhere
        # Started from QUEUED on a first delivery: no delivery started its job before (the
        # job is started only after this step), so it is started without reading it first.
        likely_new = started is ItemStart.STARTED and item.deliveries <= 1
        kind = ItemKind(spec["kind"])
        session_id = spec["session"]
        session_agent: str | None = None  # a user's session: read (and slid) by the start
        if kind is not ItemKind.CHAT_MESSAGE:
            # The batch's own session (in the payload since it was submitted; items enqueued
            # before that read it from the batch).
            session_id = session_id or await self._batch_session(tenant_id, batch_id)
            if not self._touch_due(session_id):
                session_agent = BATCH_AGENT_ID
        ctx = CallContext(
            tenant_id=tenant_id,
            request_id=spec.get("request_id") or batch_id,
            traceparent=traceparent,
        )
        message = ChatMessage(
            session_id=session_id,
            content=spec["content"],
            kind=kind.work_kind,
            model=spec.get("model", ""),
            collections=tuple(spec.get("collections") or ()),
            # Batch items are independent: they run side by side, also on a user's session
            # (holding them in the session's line would keep worker slots waiting).
            if_busy=IfBusy.RUN,
        )
        try:
            outcome = await self._run(
                ctx, batch_id, index, message, likely_new=likely_new, session_agent=session_agent
            )
        except Unavailable:
            raise  # the worker gives the delivery back uncounted; the item is still RUNNING
        except OverLimit as exc:
            # Its tenant is at a limit toward the service: nothing was started; the item
            # waits in the queue (RUNNING here) and is delivered again later.
            raise Deferred(exc.reached.retry_after_ms, exc.message) from None
        except DomainError as exc:
            outcome = _refused(exc)
        await self._finish_items((ref, outcome))
        return DONE

    async def dead_lettered(self, item: WorkItem, error: str) -> None:
        """The queue gave up on the item: it fails (retryable), so the batch can finish."""
        spec: dict[str, Any] = json.loads(item.payload)
        outcome = ItemOutcome(
            ItemState.FAILED,
            error={
                "code": "dead_lettered",
                "message": f"gave up after {item.deliveries} deliveries: {error}",
                "retryable": True,
            },
        )
        await self._store.finish_item(spec["tenant"], spec["batch"], int(spec["index"]), outcome)

    async def _run(
        self,
        ctx: CallContext,
        batch_id: str,
        index: int,
        message: ChatMessage,
        *,
        likely_new: bool,
        session_agent: str | None,
    ) -> ItemOutcome:
        job_id = item_job_id(batch_id, index)
        if not likely_new:
            # The job may exist without being attached (its delivery died in between); attach
            # it, so that a cancellation finds it.
            await self._attach(ctx, batch_id, index, job_id, message.session_id)
        events = self._chat.run_once(
            ctx, message, job_id, likely_new=likely_new, session_agent=session_agent
        )
        async for event in events:
            if event.kind is EventKind.ACCEPTED:
                await self._attach(ctx, batch_id, index, job_id, message.session_id)
            elif event.kind.is_final:
                return outcome_of(event)
        # The follow ended before the job did: the session closed, or this process is
        # stopping (then the queue gives the item to another delivery).
        if await self._chat.session_is_open(ctx.tenant_id, message.session_id):
            raise FollowInterrupted(f"stopped following the job of item {index}")
        error = {"code": "session_closed", "message": "the session closed", "retryable": False}
        return ItemOutcome(ItemState.FAILED, error=error)

    async def _attach(
        self, ctx: CallContext, batch_id: str, index: int, job_id: str, session_id: str
    ) -> None:
        """Record the item's job; cancel it when the batch is being cancelled (or the item
        already ended)."""
        ref = ItemRef(ctx.tenant_id, batch_id, index)
        if not await self._attach_jobs((ref, job_id, session_id)):
            await self._manager.cancel_job(ctx, session_id, job_id)

    async def _batch_session(self, tenant_id: str, batch_id: str) -> str:
        """The batch's own session, read from the batch (once per batch and process)."""
        key = (tenant_id, batch_id)
        session_id = self._sessions_of.get(key)
        if session_id is None:
            batch = await self._store.get_batch(tenant_id, batch_id)
            session_id = batch.session_id if batch is not None else ""
            if len(self._sessions_of) >= _REMEMBERED:
                self._sessions_of.clear()
            self._sessions_of[key] = session_id
        return session_id

    def _touch_due(self, session_id: str) -> bool:
        """Whether an item on a batch's own session should read it (sliding its expiry, as
        any message on a session does): once per TOUCH_EVERY_S per session and process; the
        items in between start their jobs without reading it."""
        now = time.monotonic()
        last = self._touched.get(session_id)
        if last is not None and now - last < TOUCH_EVERY_S:
            return False
        if len(self._touched) >= _REMEMBERED:
            self._touched.clear()
        self._touched[session_id] = now
        return True

"""Batch rules: validation, submission through the work queue, reads, cancellation, expiry and
the result stream.

A batch is stored (domain.ports.batches.BatchStore) with every item QUEUED, then each item is
enqueued on the work queue (domain.ports.queue) as ``<batch_id>/<index>`` at the batch's
priority, its spec in the payload. Workers run items with domain.batch_runner.BatchRunner,
through ChatOrchestrator like any chat message. Items without a session of their own (LLM, RAG
and embedding items) run on one internal session created per batch at submission (agent
``batch``, metadata ``batch_id``), so their events can be followed like any session's.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

from domain.batch_models import (
    Batch,
    BatchItemSpec,
    BatchState,
    ItemKind,
    ItemResult,
    ItemState,
    NewBatch,
    item_queue_id,
)
from domain.chat import (
    BATCH_AGENT_ID,
    MAX_COLLECTIONS,
    MAX_CONTENT_CHARS,
    MAX_MODEL_CHARS,
    ChatOrchestrator,
)
from domain.dispatch import CallContext
from domain.errors import (
    Aborted,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from domain.ids import is_resource_id, new_id, require_id
from domain.models import Page, page_limit
from domain.outages import OutageWait
from domain.periodic import PeriodicTask
from domain.ports.batches import BatchStore
from domain.ports.queue import NewWorkItem, QueuePriority, WorkQueue
from domain.sessions import SessionManager, metadata_violations

log = logging.getLogger(__name__)

MAX_CUSTOM_ID_CHARS = 128
MAX_IDEMPOTENCY_KEY_CHARS = 128
MIN_WINDOW_MS = 1000
WORK_KIND = "batch_item"  # the work queue's kind for batch items
_ENQUEUE_CHUNK = 500
_RESULT_PAGE = 500
_STREAM_WAIT_S = 1.0
_OUTAGE_WAITED_OUT_S = 30.0  # a result stream waits out a backend outage this long


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """Configured batch limits, in milliseconds."""

    max_items: int = 10_000
    default_window_ms: int = 24 * 3600 * 1000
    max_window_ms: int = 7 * 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class ItemInput:
    """One item as the caller sent it (kind None: not set)."""

    custom_id: str
    kind: ItemKind | None
    content: str
    session_id: str = ""
    model: str = ""
    collections: Sequence[str] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class BatchSubmission:
    """A SubmitBatch request, already translated from protobuf."""

    items: Sequence[ItemInput]
    priority: QueuePriority = QueuePriority.NORMAL
    idempotency_key: str = ""
    window_ms: int | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


def require_batch_id(value: str, field: str = "batch_id") -> str:
    return require_id(value, field, "batch id")


def validate_submission(sub: BatchSubmission, policy: BatchPolicy) -> list[BatchItemSpec]:
    """Check every field; InvalidArgument names each bad one (``items[3].content``)."""
    violations: list[FieldViolation] = []
    if not sub.items:
        violations.append(FieldViolation("items", "is required"))
    elif len(sub.items) > policy.max_items:
        violations.append(FieldViolation("items", f"has more than {policy.max_items} items"))
    if len(sub.idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
        violations.append(
            FieldViolation("idempotency_key", f"exceeds {MAX_IDEMPOTENCY_KEY_CHARS} characters")
        )
    if sub.window_ms is not None and not MIN_WINDOW_MS <= sub.window_ms <= policy.max_window_ms:
        violations.append(
            FieldViolation(
                "completion_window",
                f"must be between {MIN_WINDOW_MS / 1000:g}s and {policy.max_window_ms / 1000:g}s",
            )
        )
    violations.extend(metadata_violations(sub.metadata))
    specs: list[BatchItemSpec] = []
    seen: set[str] = set()
    for index, item in enumerate(sub.items[: policy.max_items]):
        problems = _item_violations(item, seen)
        violations.extend(FieldViolation(f"items[{index}].{f}", d) for f, d in problems)
        seen.add(item.custom_id)
        if not problems and item.kind is not None:
            specs.append(
                BatchItemSpec(
                    index=index,
                    custom_id=item.custom_id,
                    kind=item.kind,
                    content=item.content,
                    session_id=item.session_id,
                    model=item.model,
                    collections=tuple(item.collections),
                )
            )
        if len(violations) >= 100:  # enough to act on; the reply stays small
            break
    if violations:
        raise InvalidArgument(violations)
    return specs


def _item_violations(item: ItemInput, seen: set[str]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if not item.custom_id:
        problems.append(("custom_id", "is required"))
    elif len(item.custom_id) > MAX_CUSTOM_ID_CHARS:
        problems.append(("custom_id", f"exceeds {MAX_CUSTOM_ID_CHARS} characters"))
    elif item.custom_id in seen:
        problems.append(("custom_id", "is not unique in the batch"))
    if item.kind is None:
        problems.append(("kind", "is required"))
    elif item.kind is ItemKind.CHAT_MESSAGE:
        if not item.session_id:
            problems.append(("session_id", "is required for chat messages"))
        elif not is_resource_id(item.session_id):
            problems.append(("session_id", "is not a valid session id"))
    elif item.session_id:
        problems.append(("session_id", "is only allowed for chat messages"))
    if not item.content.strip():
        problems.append(("content", "is required"))
    elif len(item.content) > MAX_CONTENT_CHARS:
        problems.append(("content", f"exceeds {MAX_CONTENT_CHARS} characters"))
    if len(item.model) > MAX_MODEL_CHARS:
        problems.append(("model", f"exceeds {MAX_MODEL_CHARS} characters"))
    if item.collections and item.kind is not ItemKind.RAG_QUERY:
        problems.append(("collections", "is only allowed for RAG queries"))
    elif len(item.collections) > MAX_COLLECTIONS:
        problems.append(("collections", f"has more than {MAX_COLLECTIONS}"))
    return problems


def encode_item(
    tenant_id: str,
    batch_id: str,
    spec: BatchItemSpec,
    request_id: str,
    traceparent: str | None = None,
    batch_session_id: str = "",
) -> bytes:
    """The work queue payload of an item (``traceparent``: the trace context of the call that
    submitted the batch, which the item's run continues). ``session``: a chat message's
    session, else the batch's own (``batch_session_id``), so the runner need not read the
    batch for it."""
    payload = {
        "tenant": tenant_id,
        "batch": batch_id,
        "index": spec.index,
        "custom_id": spec.custom_id,
        "kind": spec.kind.value,
        "content": spec.content,
        "session": spec.session_id or batch_session_id,
        "model": spec.model,
        "collections": list(spec.collections),
        "request_id": request_id,
    }
    if traceparent:
        payload["tp"] = traceparent
    return json.dumps(payload, separators=(",", ":")).encode()


def encode_page_token(batch_id: str, state: BatchState | None) -> str:
    raw = json.dumps({"after": batch_id, "state": state.value if state else ""})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(token: str, state: BatchState | None) -> str:
    try:
        payload = json.loads(base64.urlsafe_b64decode((token + "=" * (-len(token) % 4)).encode()))
        after, filtered = payload["after"], payload["state"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidArgument.field("page_token", "is not a valid page token") from None
    if not isinstance(after, str) or not is_resource_id(after):
        raise InvalidArgument.field("page_token", "is not a valid page token")
    if filtered != (state.value if state else ""):
        raise InvalidArgument.field("page_token", "was issued for a different state filter")
    return after


CANCELLED_ERROR = {"code": "cancelled", "message": "the batch was cancelled", "retryable": False}
EXPIRED_ERROR = {
    "code": "expired",
    "message": "the batch's completion window passed before the item finished",
    "retryable": True,
}


class BatchManager:
    """Submits, reads, lists, cancels and expires batches and streams their results."""

    def __init__(
        self,
        store: BatchStore,
        queue: WorkQueue,
        sessions: SessionManager,
        chat: ChatOrchestrator,
        policy: BatchPolicy,
        *,
        session_max_ttl_ms: int,
    ) -> None:
        self._store = store
        self._queue = queue
        self._sessions = sessions
        self._chat = chat
        self._policy = policy
        self._session_max_ttl_ms = session_max_ttl_ms

    async def submit(self, ctx: CallContext, sub: BatchSubmission) -> Batch:
        specs = validate_submission(sub, self._policy)
        tenant_id = ctx.tenant_id
        if sub.idempotency_key:
            existing = await self._store.find_by_idempotency_key(tenant_id, sub.idempotency_key)
            if existing is not None:
                return await self._settle(existing)
        window_ms = sub.window_ms or self._policy.default_window_ms
        batch_id = new_id()
        session_id = ""
        if any(spec.kind is not ItemKind.CHAT_MESSAGE for spec in specs):
            session = await self._sessions.create(
                tenant_id,
                agent_id=BATCH_AGENT_ID,
                user_id="",
                metadata={"batch_id": batch_id},
                ttl_ms=min(window_ms + 3600_000, self._session_max_ttl_ms),
            )
            session_id = session.session_id
        new = NewBatch(
            batch_id=batch_id,
            priority=sub.priority,
            idempotency_key=sub.idempotency_key,
            metadata=dict(sub.metadata),
            window_ms=window_ms,
            custom_ids=[spec.custom_id for spec in specs],
            session_id=session_id,
        )
        batch, created = await self._store.create_batch(tenant_id, new)
        if not created:  # the same key won a race with this call
            if session_id:
                await self._sessions.close(tenant_id, session_id)
            return batch
        work = [
            NewWorkItem(
                item_id=item_queue_id(batch_id, spec.index),
                tenant_id=tenant_id,
                kind=WORK_KIND,
                payload=encode_item(
                    tenant_id, batch_id, spec, ctx.request_id, ctx.traceparent, session_id
                ),
                priority=sub.priority,
                batch_id=batch_id,
            )
            for spec in specs
        ]
        for start in range(0, len(work), _ENQUEUE_CHUNK):
            await self._queue.enqueue(work[start : start + _ENQUEUE_CHUNK])
        log.info("batch %s of tenant %s queued with %d items", batch_id, tenant_id, len(specs))
        return batch

    async def get(self, tenant_id: str, batch_id: str) -> Batch:
        """A batch; NotFound for missing ids and other tenants' batches."""
        require_batch_id(batch_id)
        batch = await self._store.get_batch(tenant_id, batch_id)
        if batch is None:
            raise NotFound(f"batch {batch_id} not found")
        return await self._settle(batch)

    async def _settle(self, batch: Batch) -> Batch:
        """Expire a batch found past its window (the sweeper may not have run yet)."""
        if batch.state.is_final or _now_ms() < batch.expire_ms:
            return batch
        return await self.expire(batch.tenant_id, batch.batch_id) or batch

    async def list(
        self, tenant_id: str, *, page_size: int, page_token: str, state: BatchState | None
    ) -> Page[Batch]:
        limit = page_limit(page_size)
        after = decode_page_token(page_token, state) if page_token else None
        page = await self._store.list_batches(tenant_id, limit=limit, after=after, state=state)
        token = encode_page_token(page.next_cursor, state) if page.next_cursor else None
        return Page(page.items, token)

    async def cancel(self, ctx: CallContext, batch_id: str) -> Batch:
        """Cancel queued items now and running ones downstream; a final batch is returned as
        it is."""
        batch = await self.get(ctx.tenant_id, batch_id)
        if batch.state.is_final:
            return batch
        return await self._stop(ctx, batch_id, BatchState.CANCELLED, CANCELLED_ERROR)

    async def expire(self, tenant_id: str, batch_id: str) -> Batch | None:
        """Mark every unfinished item expired and cancel the jobs of running ones."""
        ctx = CallContext(tenant_id=tenant_id, request_id=f"batch-expiry-{batch_id}")
        batch = await self._stop(ctx, batch_id, BatchState.EXPIRED, EXPIRED_ERROR)
        if batch.state.is_final:
            await self._store.forget_expiry(tenant_id, batch_id)
        return batch

    async def _stop(
        self, ctx: CallContext, batch_id: str, state: BatchState, error: dict[str, object]
    ) -> Batch:
        batch, running = await self._store.stop_batch(ctx.tenant_id, batch_id, state, error)
        if batch is None:
            raise NotFound(f"batch {batch_id} not found")
        for item in running:
            if item.job_id:  # else its runner sees the cancellation when it attaches the job
                await self.cancel_job(ctx, item.session_id, item.job_id)
        if running:
            log.info("batch %s %s: %d running items stopped", batch_id, state, len(running))
        return batch

    async def reopen_item(self, tenant_id: str, batch_id: str, index: int) -> None:
        """Re-open an item whose work item an operator redrives from the dead letter, so that
        the redriven delivery runs it and its result replaces the failure (see
        BatchStore.reopen_item). FailedPrecondition, naming why, when it must not run again:
        its batch was cancelled or expired (or its window passed), or the item already ended
        otherwise; NotFound for a batch or item that is gone."""
        batch = await self.get(tenant_id, batch_id)  # expires one found past its window
        state, item = await self._store.reopen_item(tenant_id, batch_id, index)
        if item is ItemState.QUEUED:
            return
        if state is None or item is None:
            raise NotFound(f"item {index} of batch {batch_id} not found")
        if state in (BatchState.CANCELLING, BatchState.CANCELLED):
            raise FailedPrecondition(f"batch {batch_id} was cancelled: its items do not run")
        if state is BatchState.EXPIRED or _now_ms() >= batch.expire_ms:
            raise FailedPrecondition(f"batch {batch_id} expired: its items do not run")
        raise FailedPrecondition(f"item {index} of batch {batch_id} already ended {item.value}")

    async def cancel_job(self, ctx: CallContext, session_id: str, job_id: str) -> None:
        """Cancel a job through the chat flow; a job that already ended is fine."""
        try:
            await self._chat.cancel(ctx, session_id, job_id)
        except DomainError as exc:
            log.debug("job %s not cancelled: %s", job_id, exc.message)

    async def stream_results(
        self, tenant_id: str, batch_id: str, after: int
    ) -> AsyncIterator[ItemResult]:
        """Results with sequence > ``after`` as they are appended, until the batch is final and
        every result was yielded; a backend outage of up to _OUTAGE_WAITED_OUT_S is waited
        out."""
        if after < 0:
            raise InvalidArgument.field("after_sequence", "must not be negative")
        # The state is read before each page of results: a final batch has every result
        # appended already.
        batch: Batch | None = await self.get(tenant_id, batch_id)
        cursor = after
        outage = OutageWait(f"result stream of batch {batch_id}")
        while batch is not None:
            final = batch.state.is_final
            try:
                results = await self._store.read_results(
                    tenant_id,
                    batch_id,
                    cursor,
                    limit=_RESULT_PAGE,
                    wait_s=0 if final else _STREAM_WAIT_S,
                )
                if final and not results:
                    return
                batch = await self._store.get_batch(tenant_id, batch_id)
                if batch is not None:
                    batch = await self._settle(batch)
            except Unavailable as exc:
                # Redis restarting: wait it out as session streams do, then read this page
                # again; an outage that lasts ends the stream.
                await outage.wait(exc, limit_s=_OUTAGE_WAITED_OUT_S, retry_s=_STREAM_WAIT_S)
                continue
            outage.over()
            for result in results:
                cursor = result.sequence
                yield result
        # A batch is kept for its retention after it became final, so one that vanished while
        # followed was lost with the backend's data: never end as if it had finished.
        raise Aborted(f"the record of batch {batch_id} was lost (the backend lost its data)")


class BatchExpirer(PeriodicTask):
    """Expires batches past their completion window. Every server process runs one; the store
    makes each expiry atomic, so several are safe. domain.periodic runs the loop; a pass the
    store refuses (any domain error) is logged at DEBUG."""

    def __init__(self, store: BatchStore, manager: BatchManager, *, interval_s: float) -> None:
        super().__init__("batch-expirer", self.expire_once, interval_s, quiet=(DomainError,))
        self._store = store
        self._manager = manager

    async def expire_once(self) -> int:
        due = await self._store.due_for_expiry(limit=100)
        for tenant_id, batch_id in due:
            try:
                await self._manager.expire(tenant_id, batch_id)
            except NotFound:
                await self._store.forget_expiry(tenant_id, batch_id)
        return len(due)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000

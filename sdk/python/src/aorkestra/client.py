"""The asynchronous client: ``AsyncClient`` with ``sessions``, ``chat``, ``batches`` and the
admin APIs (``keys``, ``tasks``, ``usage``), plus ``health``."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

import grpc
import grpc.aio
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aorkestra import events as ev
from aorkestra._proto.orchestrator.admin.v1 import admin_pb2
from aorkestra._proto.orchestrator.v1 import (
    batch_pb2,
    chat_pb2,
    common_pb2,
    session_pb2,
)
from aorkestra._transport import OnTruncated, RetryNotice, Transport
from aorkestra.config import ClientConfig
from aorkestra.errors import OrchestratorError, from_rpc_error
from aorkestra.retry import RetryPolicy

WorkKind = Literal["llm_query", "rag_query", "embedding"]
Priority = Literal["high", "normal", "low"]


class _ProtoEnum(Protocol):
    def items(self) -> Iterable[tuple[str, int]]: ...


def _by_short_name(enum: _ProtoEnum, prefix: str) -> dict[str, int]:
    """An enum's values by the names the SDK takes: ``prefix`` dropped, lower case
    (PRIORITY_HIGH: high); the unspecified value (0) left out."""
    return {name.removeprefix(prefix).lower(): number for name, number in enum.items() if number}


_KINDS = _by_short_name(common_pb2.WorkKind, "WORK_KIND_")
_BATCH_KINDS = _by_short_name(batch_pb2.BatchItemKind, "BATCH_ITEM_KIND_")
_PRIORITIES = _by_short_name(common_pb2.Priority, "PRIORITY_")
_SERVICES = _by_short_name(common_pb2.Service, "SERVICE_")
_ROLES = _by_short_name(admin_pb2.ApiKeyRole, "API_KEY_ROLE_")
_SESSION_STATES = _by_short_name(session_pb2.SessionState, "SESSION_STATE_")

BATCH_DONE = frozenset(
    {
        batch_pb2.BATCH_STATE_COMPLETED,
        batch_pb2.BATCH_STATE_FAILED,
        batch_pb2.BATCH_STATE_CANCELLED,
        batch_pb2.BATCH_STATE_EXPIRED,
    }
)


def _duration(value: float | timedelta | None) -> duration_pb2.Duration | None:
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    out = duration_pb2.Duration()
    out.FromTimedelta(timedelta(seconds=seconds))
    return out


def _choice(table: Mapping[str, int], value: str | None, what: str) -> int:
    if value is None:
        return 0
    try:
        return table[value]
    except KeyError:
        raise ValueError(f"{what} must be one of {', '.join(table)}; got {value!r}") from None


class _Api:
    """One of the client's APIs. They share the client's transport: its channel, its stubs
    and its retry loops."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport


class Sessions(_Api):
    async def create(
        self,
        agent_id: str,
        *,
        user_id: str = "",
        metadata: Mapping[str, str] | None = None,
        ttl: float | timedelta | None = None,
    ) -> session_pb2.Session:
        """A new session (not retried on UNAVAILABLE: a retry could create two)."""
        request = session_pb2.CreateSessionRequest(
            agent_id=agent_id, user_id=user_id, metadata=dict(metadata or {}), ttl=_duration(ttl)
        )
        response = await self._t.unary(self._t.sessions.CreateSession, request, safe=False)
        return response.session

    async def get(self, session_id: str) -> session_pb2.Session:
        request = session_pb2.GetSessionRequest(session_id=session_id)
        response = await self._t.unary(self._t.sessions.GetSession, request, safe=True)
        return response.session

    async def list(
        self, *, page_size: int = 50, page_token: str = "", state: str | None = None
    ) -> session_pb2.ListSessionsResponse:
        """One page; ``state``: active, busy, closed or expired."""
        request = session_pb2.ListSessionsRequest(page_size=page_size, page_token=page_token)
        if state is not None:
            request.state = _choice(_SESSION_STATES, state, "state")  # type: ignore[assignment]
        return await self._t.unary(self._t.sessions.ListSessions, request, safe=True)

    async def iterate(self, *, state: str | None = None) -> AsyncIterator[session_pb2.Session]:
        """Every session of the caller's tenant, page after page."""
        token = ""
        while True:
            page = await self.list(page_token=token, state=state)
            for session in page.sessions:
                yield session
            token = page.next_page_token
            if not token:
                return

    async def close(self, session_id: str) -> session_pb2.Session:
        """Closes a session (idempotent, so retried like a read)."""
        request = session_pb2.CloseSessionRequest(session_id=session_id)
        response = await self._t.unary(self._t.sessions.CloseSession, request, safe=True)
        return response.session

    def follow(
        self, session_id: str, *, after: int = 0, on_truncated: OnTruncated = "raise"
    ) -> AsyncIterator[ev.Event]:
        """Every event of the session after sequence ``after``, for as long as it is open.
        Survives dropped connections and server restarts: it reconnects with backoff and
        jitter from the last sequence seen, and never yields a sequence twice."""
        return self._t.follow(session_id, after, on_truncated=on_truncated)


class Chat(_Api):
    async def send(
        self,
        session_id: str,
        content: str,
        *,
        kind: WorkKind | None = None,
        model: str = "",
        collections: Iterable[str] = (),
        background: bool = False,
        priority: Priority | None = None,
        reject_if_busy: bool = False,
        on_truncated: OnTruncated = "raise",
    ) -> AsyncIterator[ev.Event]:
        """Sends a message and yields its job's events up to the final one (completed,
        failed, timed_out or cancelled). Once the job is accepted, a dropped stream resumes
        on the session's stream from the last sequence seen; before that, only a rate-limited
        send (RESOURCE_EXHAUSTED with RetryInfo) is sent again."""
        request = chat_pb2.SendMessageRequest(
            session_id=session_id,
            content=content,
            kind=_choice(_KINDS, kind, "kind"),  # type: ignore[arg-type]
            model=model,
            collections=list(collections),
            background=background,
            priority=_choice(_PRIORITIES, priority, "priority"),  # type: ignore[arg-type]
            busy_policy=(
                chat_pb2.BUSY_POLICY_REJECT if reject_if_busy else chat_pb2.BUSY_POLICY_UNSPECIFIED
            ),
        )
        attempt = 0
        job_id = ""
        cursor = 0
        while True:
            attempt += 1
            call = self._t.chat.SendMessage(request, metadata=self._t.metadata)
            try:
                async for message in call:
                    pb = message.event
                    if job_id and pb.job_id and pb.job_id != job_id:
                        continue
                    job_id = job_id or pb.job_id
                    cursor = max(cursor, pb.sequence)
                    event = ev.from_proto(pb)
                    yield event
                    if event.final:
                        return
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc, "SendMessage")
                if not job_id:
                    # Not accepted yet: only a refusal the server timed may be sent again.
                    delay = self._t.retry_delay(
                        error, attempt, safe=False, limit=self._t.config.retry.max_attempts
                    )
                    if delay is None:
                        raise error from None
                    await self._t.wait_retry("SendMessage", error, attempt, delay)
                    continue
                async for event in self._t.follow(
                    session_id,
                    cursor,
                    on_truncated=on_truncated,
                    job_id=job_id,
                    until_final=True,
                    first_error=error,
                ):
                    yield event
                return
            finally:
                call.cancel()
            if not job_id:
                raise OrchestratorError("SendMessage ended without an event", method="SendMessage")
            # Ended before the final event (the server is stopping): follow the job.
            async for event in self._t.follow(
                session_id, cursor, on_truncated=on_truncated, job_id=job_id, until_final=True
            ):
                yield event
            return

    async def reply(self, session_id: str, content: str, **options: Any) -> str:
        """Sends a message and returns the final text: the completed result's text, or the
        deltas joined when the result carries none. Raises JobFailedError when the job fails,
        times out or is cancelled."""
        deltas: list[str] = []
        async for event in self.send(session_id, content, **options):
            if isinstance(event, ev.Delta):
                deltas.append(event.text)
            elif isinstance(event, ev.Completed):
                return event.text or "".join(deltas)
            elif event.final:
                raise JobFailedError(event)
        raise OrchestratorError("the job's events ended without a final event")

    async def cancel(self, session_id: str, job_id: str) -> ev.Event:
        """Cancels a job (idempotent); returns the event the cancellation produced."""
        request = chat_pb2.CancelJobRequest(session_id=session_id, job_id=job_id)
        response = await self._t.unary(self._t.chat.CancelJob, request, safe=True)
        return ev.from_proto(response.event)


class JobFailedError(OrchestratorError):
    """A job ended failed, timed out or cancelled (``event`` is its final event)."""

    def __init__(self, event: ev.Event) -> None:
        detail = ""
        if isinstance(event, ev.Failed):
            detail = f": {event.error.code}: {event.error.message}"
        elif isinstance(event, ev.Cancelled):
            detail = f": {event.reason}"
        super().__init__(f"job {event.job_id} {event.kind}{detail}", request_id=event.request_id)
        self.event = event


@dataclass(frozen=True, slots=True)
class BatchProgress:
    """Told to ``wait``'s progress callback at every poll."""

    batch: batch_pb2.Batch
    done: int  # items that finished (completed, failed, cancelled or expired)
    total: int
    elapsed_s: float

    @property
    def rate_per_s(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0


def batch_item(data: Mapping[str, Any] | batch_pb2.BatchItem) -> batch_pb2.BatchItem:
    """A BatchItem from a dict: ``custom_id``, ``content``, optional ``kind`` (llm_query by
    default, rag_query, embedding, or chat_message with a ``session_id``), ``model``,
    ``collections``."""
    if isinstance(data, batch_pb2.BatchItem):
        return data
    known = {"custom_id", "kind", "session_id", "content", "model", "collections"}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown batch item fields: {', '.join(sorted(unknown))}")
    return batch_pb2.BatchItem(
        custom_id=str(data.get("custom_id", "")),
        kind=_choice(_BATCH_KINDS, data.get("kind", "llm_query"), "kind"),  # type: ignore[arg-type]
        session_id=str(data.get("session_id", "")),
        content=str(data.get("content", "")),
        model=str(data.get("model", "")),
        collections=[str(c) for c in data.get("collections", ())],
    )


def read_jsonl(path: str | Path) -> list[batch_pb2.BatchItem]:
    """Batch items from a JSONL file (one JSON object per line; blank lines skipped)."""
    items: list[batch_pb2.BatchItem] = []
    with Path(path).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if not isinstance(data, dict):
                    raise ValueError("expected a JSON object")
                items.append(batch_item(data))
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: {exc}") from None
    return items


class Batches(_Api):
    async def submit(
        self,
        items: Iterable[Mapping[str, Any] | batch_pb2.BatchItem],
        *,
        priority: Priority | None = None,
        completion_window: float | timedelta | None = None,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> batch_pb2.Batch:
        """Submits a batch. An idempotency key is made when none is given, so the submit is
        retried safely: a repeat returns the batch the first attempt created."""
        request = batch_pb2.SubmitBatchRequest(
            items=[batch_item(item) for item in items],
            priority=_choice(_PRIORITIES, priority, "priority"),  # type: ignore[arg-type]
            idempotency_key=idempotency_key or uuid.uuid4().hex,
            completion_window=_duration(completion_window),
            metadata=dict(metadata or {}),
        )
        response = await self._t.unary(self._t.batches.SubmitBatch, request, safe=True)
        return response.batch

    async def submit_jsonl(self, path: str | Path, **options: Any) -> batch_pb2.Batch:
        """Submits the items of a JSONL file (see read_jsonl)."""
        return await self.submit(read_jsonl(path), **options)

    async def get(self, batch_id: str) -> batch_pb2.Batch:
        request = batch_pb2.GetBatchRequest(batch_id=batch_id)
        response = await self._t.unary(self._t.batches.GetBatch, request, safe=True)
        return response.batch

    async def list(
        self, *, page_size: int = 50, page_token: str = ""
    ) -> batch_pb2.ListBatchesResponse:
        request = batch_pb2.ListBatchesRequest(page_size=page_size, page_token=page_token)
        return await self._t.unary(self._t.batches.ListBatches, request, safe=True)

    async def cancel(self, batch_id: str) -> batch_pb2.Batch:
        request = batch_pb2.CancelBatchRequest(batch_id=batch_id)
        response = await self._t.unary(self._t.batches.CancelBatch, request, safe=True)
        return response.batch

    async def wait(
        self,
        batch_id: str,
        *,
        progress: Callable[[BatchProgress], None] | None = None,
        poll_s: float = 0.5,
        timeout_s: float | None = None,
    ) -> batch_pb2.Batch:
        """Polls the batch until it ends (completed, failed, cancelled or expired), telling
        ``progress`` its counts at every poll; returns the final batch."""
        started = time.monotonic()
        while True:
            batch = await self.get(batch_id)
            c = batch.counts
            done = c.completed + c.failed + c.cancelled + c.expired
            if progress is not None:
                progress(BatchProgress(batch, done, c.total, time.monotonic() - started))
            if batch.state in BATCH_DONE:
                return batch
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                raise TimeoutError(
                    f"batch {batch_id} still {batch_pb2.BatchState.Name(batch.state)}"
                )
            await asyncio.sleep(poll_s)

    async def results(
        self, batch_id: str, *, after: int = 0
    ) -> AsyncIterator[batch_pb2.BatchItemResult]:
        """Item results in ``sequence`` order after ``after``, until the server ends the
        stream. A dropped stream is reopened from the last sequence seen; none is repeated."""
        cursor = after
        failures = 0
        while True:
            call = self._t.batches.StreamBatchResults(
                batch_pb2.StreamBatchResultsRequest(batch_id=batch_id, after_sequence=cursor),
                metadata=self._t.metadata,
            )
            try:
                async for message in call:
                    result = message.result
                    if result.sequence <= cursor:
                        continue
                    cursor = result.sequence
                    failures = 0
                    yield result
                return
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc, "StreamBatchResults")
                failures += 1
                delay = self._t.stream_delay(error, failures)
                if delay is None:
                    raise error from None
                await self._t.wait_retry("StreamBatchResults", error, failures, delay)
            finally:
                call.cancel()


class Keys(_Api):
    """API keys (admin role)."""

    async def create(
        self,
        tenant_id: str,
        role: Literal["client", "service", "admin"],
        description: str = "",
        *,
        services: Iterable[str] = (),
    ) -> admin_pb2.CreateApiKeyResponse:
        """A new key; its secret (``api_key``) is shown only in this response. ``services``
        (service keys only): the services it speaks for (query, embedding, agent_execution,
        workflow_engine, conversation, agent_management, tool_registry); none: every one."""
        request = admin_pb2.CreateApiKeyRequest(
            tenant_id=tenant_id,
            role=_choice(_ROLES, role, "role"),  # type: ignore[arg-type]
            description=description,
            services=[_choice(_SERVICES, name, "service") for name in services],  # type: ignore[misc]
        )
        return await self._t.unary(self._t.admin.CreateApiKey, request, safe=False)

    async def list(
        self, tenant_id: str = "", *, page_size: int = 100, page_token: str = ""
    ) -> admin_pb2.ListApiKeysResponse:
        request = admin_pb2.ListApiKeysRequest(
            tenant_id=tenant_id, page_size=page_size, page_token=page_token
        )
        return await self._t.unary(self._t.admin.ListApiKeys, request, safe=True)

    async def revoke(self, key_id: str) -> admin_pb2.ApiKey:
        request = admin_pb2.RevokeApiKeyRequest(key_id=key_id)
        response = await self._t.unary(self._t.admin.RevokeApiKey, request, safe=True)
        return response.key


class Admin(_Api):
    """Tasks and token usage (admin role)."""

    async def task(self, tenant_id: str, job_id: str) -> admin_pb2.Task:
        request = admin_pb2.GetTaskRequest(tenant_id=tenant_id, job_id=job_id)
        response = await self._t.unary(self._t.admin.GetTask, request, safe=True)
        return response.task

    async def usage(
        self, tenant_id: str, *, start_date: str = "", end_date: str = ""
    ) -> admin_pb2.GetTenantUsageResponse:
        """Token usage per day (dates YYYY-MM-DD, UTC)."""
        request = admin_pb2.GetTenantUsageRequest(
            tenant_id=tenant_id, start_date=start_date, end_date=end_date
        )
        return await self._t.unary(self._t.admin.GetTenantUsage, request, safe=True)


class AsyncClient:
    """The asynchronous client. Use as ``async with AsyncClient(...) as client:``.

    Every argument may come from the environment instead (see aorkestra.config).
    ``on_retry`` is told about every retry and reconnect before the SDK waits.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        api_key: str | None = None,
        tls: bool | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        server_name: str | None = None,
        timeout_s: float | None = None,
        retry: RetryPolicy | None = None,
        on_retry: Callable[[RetryNotice], None] | None = None,
        config: ClientConfig | None = None,
    ) -> None:
        self.config = config or ClientConfig.resolve(
            address=address,
            api_key=api_key,
            tls=tls,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            server_name=server_name,
            timeout_s=timeout_s,
            retry=retry,
        )
        self._transport = Transport(self.config, on_retry)
        self.sessions = Sessions(self._transport)
        self.chat = Chat(self._transport)
        self.batches = Batches(self._transport)
        self.keys = Keys(self._transport)
        self.admin = Admin(self._transport)

    async def health(self, service: str = "") -> str:
        """The server's health status (SERVING, NOT_SERVING, ...) for ``service`` ("" for the
        whole server)."""
        stub = health_pb2_grpc.HealthStub(self._transport.channel)
        try:
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self.config.timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "Check") from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

"""Chat work that waits for its turn in the work queue.

A message sent with ``background`` set, or sent while its session already has jobs in flight
(the default busy policy), is recorded as a QUEUED job and put on the ``chat`` work queue at
its priority. A queue worker (in the server, or an ``orchestrator worker`` process) takes the
item and hands it to :meth:`ChatOrchestrator.run_queued`, which waits until every job the
session accepted before it has finished, starts it (QUEUED -> PENDING), hands it to its
service and follows it to its final event; that event is the item's result. The job's events go
to the session's stream as any job's do, so the client that sent the message (or any follower)
sees them.

The queue delivers at least once: a worker that dies mid-item leaves the job to the next
delivery, which follows a job already started and re-sends one still PENDING. Results stay
exactly-once because the job's state machine accepts one final event.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

from domain.agents import AgentConfig
from domain.jobs import NewJob, SessionEvent
from domain.models import Service, WorkKind
from domain.plans import OrchestrationPlan
from domain.ports.queue import NewWorkItem, QueuePriority, WorkItem
from domain.ports.tracing import NO_TRACING, AttributeValue, SpanKind, Tracing

ITEM_KIND = "chat_job"
SKIPPED = b"skipped"


@dataclass(frozen=True, slots=True)
class QueuedChat:
    """What a worker needs to start a queued job: its tenant, the sequence of its accepted
    event, and the job to hand to its service when its turn comes (with the parts of the
    message the job record does not keep)."""

    tenant_id: str
    accepted_sequence: int
    job: NewJob

    def work_item(self, priority: QueuePriority) -> NewWorkItem:
        """The queue item; its id is the job id, so enqueueing twice changes nothing."""
        job = self.job
        payload = {
            "tenant": self.tenant_id,
            "job": job.job_id,
            "session": job.session_id,
            "request_id": job.request_id,
            "seq": self.accepted_sequence,
            "kind": job.kind.value,
            "content": job.content,
            "model": job.model,
            "collections": list(job.collections),
            "agent": job.agent_id,
            "ckey": job.cache_key,
        }
        if job.plan is not None:
            payload["plan"] = job.plan.to_json()
        if job.agent is not None:
            payload["agent_config"] = job.agent.to_json()
        if job.traceparent:
            payload["tp"] = job.traceparent
        return NewWorkItem(
            item_id=job.job_id,
            tenant_id=self.tenant_id,
            kind=ITEM_KIND,
            payload=json.dumps(payload, separators=(",", ":")).encode(),
            priority=priority,
        )

    @classmethod
    def from_item(cls, item: WorkItem) -> QueuedChat:
        spec = json.loads(item.payload)
        kind = WorkKind(spec["kind"])
        plan = OrchestrationPlan.from_json(spec["plan"]) if spec.get("plan") else None
        job = NewJob(
            job_id=spec["job"],
            session_id=spec["session"],
            agent_id=spec.get("agent", ""),
            service=plan.run_service if plan is not None else Service.for_kind(kind),
            kind=kind,
            content=spec["content"],
            request_id=spec.get("request_id", ""),
            model=spec.get("model", ""),
            cache_key=spec.get("ckey", ""),
            collections=tuple(spec.get("collections") or ()),
            plan=plan,
            agent=AgentConfig.from_json(spec["agent_config"]) if spec.get("agent_config") else None,
            traceparent=spec.get("tp", ""),
        )
        return cls(tenant_id=spec["tenant"], accepted_sequence=int(spec["seq"]), job=job)


def result_of(event: SessionEvent) -> bytes:
    """The work item's stored result: the job's final event."""
    body = {"job_id": event.job_id, "kind": event.kind.value, "data": dict(event.data)}
    return json.dumps(body, separators=(",", ":")).encode()


class QueuedChatFlow(Protocol):
    """What the runner needs of the chat flow (domain.chat.ChatOrchestrator implements it)."""

    async def run_queued(
        self, queued: QueuedChat, traceparent: str | None = None
    ) -> SessionEvent | None:
        """Run the queued job when its turn comes and return its final event; None when there
        was nothing to run (the job already ended, or it is unknown). ``traceparent``: the
        trace context its turn runs under (default: the job's)."""
        ...

    async def fail_queued(self, queued: QueuedChat, message: str) -> None:
        """End a queued job that its work queue gave up on as failed (if still unfinished)."""
        ...


class QueuedChatRunner:
    """The ``chat`` work queue's handler. Each delivery is a consumer span in its job's trace
    (under the span of the call that accepted the job), and the job's turn runs under it."""

    def __init__(self, chat: QueuedChatFlow, tracing: Tracing = NO_TRACING) -> None:
        self._chat = chat
        self._tracing = tracing

    async def handle(self, item: WorkItem) -> bytes:
        queued = QueuedChat.from_item(item)
        attributes: dict[str, AttributeValue] = {
            "messaging.system": "orchestrator",
            "messaging.operation": "process",
            "messaging.destination.name": "chat",
            "messaging.message.id": item.item_id,
            "orchestrator.job_id": queued.job.job_id,
            "orchestrator.deliveries": item.deliveries,
        }
        with self._tracing.job_span(
            "chat process",
            queued.job.traceparent or None,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        ) as traceparent:
            final = await self._chat.run_queued(queued, traceparent)
        return SKIPPED if final is None else result_of(final)

    async def dead_lettered(self, item: WorkItem, error: str) -> None:
        """The queue gave up on the item: its job fails, unless it already ended."""
        queued = QueuedChat.from_item(item)
        await self._chat.fail_queued(queued, f"gave up after {item.deliveries} deliveries: {error}")

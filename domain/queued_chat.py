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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from domain.agents import AgentConfig
from domain.jobs import NewJob, SessionEvent
from domain.models import Service, WorkKind
from domain.plans import OrchestrationPlan
from domain.ports.queue import NewWorkItem, QueuePriority, WorkItem

ITEM_KIND = "chat_job"
SKIPPED = b"skipped"


@dataclass(frozen=True, slots=True)
class QueuedChat:
    """What a worker needs to start a queued job: the job as recorded, and the parts of the
    message the job record does not keep."""

    tenant_id: str
    job_id: str
    session_id: str
    request_id: str
    accepted_sequence: int
    kind: WorkKind
    content: str
    model: str = ""
    collections: Sequence[str] = ()
    agent_id: str = ""
    cache_key: str = ""
    # The job's plan and the agent it was made from (loaded when the message was accepted).
    plan: OrchestrationPlan | None = None
    agent: AgentConfig | None = None

    def new_job(self) -> NewJob:
        """The job to hand to its service when its turn comes."""
        plan = self.plan
        return NewJob(
            job_id=self.job_id,
            session_id=self.session_id,
            agent_id=self.agent_id,
            service=plan.run_service if plan is not None else Service.for_kind(self.kind),
            kind=self.kind,
            content=self.content,
            request_id=self.request_id,
            model=self.model,
            cache_key=self.cache_key,
            collections=tuple(self.collections),
            plan=plan,
            agent=self.agent,
        )

    def work_item(self, priority: QueuePriority) -> NewWorkItem:
        """The queue item; its id is the job id, so enqueueing twice changes nothing."""
        payload = {
            "tenant": self.tenant_id,
            "job": self.job_id,
            "session": self.session_id,
            "request_id": self.request_id,
            "seq": self.accepted_sequence,
            "kind": self.kind.value,
            "content": self.content,
            "model": self.model,
            "collections": list(self.collections),
            "agent": self.agent_id,
            "ckey": self.cache_key,
        }
        if self.plan is not None:
            payload["plan"] = self.plan.to_json()
        if self.agent is not None:
            payload["agent_config"] = self.agent.to_json()
        return NewWorkItem(
            item_id=self.job_id,
            tenant_id=self.tenant_id,
            kind=ITEM_KIND,
            payload=json.dumps(payload, separators=(",", ":")).encode(),
            priority=priority,
        )

    @classmethod
    def from_item(cls, item: WorkItem) -> QueuedChat:
        spec = json.loads(item.payload)
        return cls(
            tenant_id=spec["tenant"],
            job_id=spec["job"],
            session_id=spec["session"],
            request_id=spec.get("request_id", ""),
            accepted_sequence=int(spec["seq"]),
            kind=WorkKind(spec["kind"]),
            content=spec["content"],
            model=spec.get("model", ""),
            collections=tuple(spec.get("collections") or ()),
            agent_id=spec.get("agent", ""),
            cache_key=spec.get("ckey", ""),
            plan=OrchestrationPlan.from_json(spec["plan"]) if spec.get("plan") else None,
            agent=AgentConfig.from_json(spec["agent_config"]) if spec.get("agent_config") else None,
        )


def result_of(event: SessionEvent) -> bytes:
    """The work item's stored result: the job's final event."""
    body = {"job_id": event.job_id, "kind": event.kind.value, "data": dict(event.data)}
    return json.dumps(body, separators=(",", ":")).encode()


class QueuedChatFlow(Protocol):
    """What the runner needs of the chat flow (domain.chat.ChatOrchestrator implements it)."""

    async def run_queued(self, queued: QueuedChat) -> SessionEvent | None:
        """Run the queued job when its turn comes and return its final event; None when there
        was nothing to run (the job already ended, or it is unknown)."""
        ...

    async def fail_queued(self, queued: QueuedChat, message: str) -> None:
        """End a queued job that its work queue gave up on as failed (if still unfinished)."""
        ...


class QueuedChatRunner:
    """The ``chat`` work queue's handler."""

    def __init__(self, chat: QueuedChatFlow) -> None:
        self._chat = chat

    async def handle(self, item: WorkItem) -> bytes:
        final = await self._chat.run_queued(QueuedChat.from_item(item))
        return SKIPPED if final is None else result_of(final)

    async def dead_lettered(self, item: WorkItem, error: str) -> None:
        """The queue gave up on the item: its job fails, unless it already ended."""
        queued = QueuedChat.from_item(item)
        await self._chat.fail_queued(queued, f"gave up after {item.deliveries} deliveries: {error}")

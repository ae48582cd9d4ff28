"""Driving the job flow from tests: sessions, messages, notices, streams."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from orchestrator.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    common_pb2,
    session_pb2,
    session_pb2_grpc,
    task_update_pb2,
    task_update_pb2_grpc,
)
from tests.support.downstream import RecordingDispatcher
from tests.support.servers import RunningServer, service, tenant

if TYPE_CHECKING:
    from orchestrator.v1.chat_pb2_grpc import ChatServiceAsyncStub
    from orchestrator.v1.session_pb2_grpc import SessionServiceAsyncStub
    from orchestrator.v1.task_update_pb2_grpc import TaskUpdateServiceAsyncStub

Event = chat_pb2.ChatEvent
TIMEOUT_S = 10.0
EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]


def notice(
    job_id: str,
    sequence: int,
    event: str,
    *,
    tenant_id: str = "acme",
    service_pb: int = common_pb2.SERVICE_QUERY,
    **fields: Any,
) -> task_update_pb2.PublishUpdatesRequest:
    """A notice; event is progress, delta, completed or failed."""
    return task_update_pb2.PublishUpdatesRequest(
        event=getattr(task_update_pb2, f"NOTICE_EVENT_{event.upper()}"),
        service=service_pb,  # type: ignore[arg-type]
        job_id=job_id,
        tenant_id=tenant_id,
        sequence=sequence,
        **fields,
    )


def completed(job_id: str, sequence: int, text: str, **kw: Any) -> Any:
    return notice(
        job_id,
        sequence,
        "completed",
        result=common_pb2.JobResult(text=text, model="m1"),
        usage=common_pb2.TokenUsage(prompt_tokens=3, completion_tokens=5, total_tokens=8),
        **kw,
    )


def kind_of(event: Event) -> str:
    return str(event.WhichOneof("kind"))


@dataclass
class Flow:
    running: RunningServer
    dispatcher: RecordingDispatcher

    @property
    def channel(self) -> grpc.aio.Channel:
        return self.running.channel

    @property
    def chat(self) -> ChatServiceAsyncStub:
        return chat_pb2_grpc.ChatServiceStub(self.channel)

    @property
    def sessions(self) -> SessionServiceAsyncStub:
        return session_pb2_grpc.SessionServiceStub(self.channel)

    async def new_session(self, tenant_id: str = "acme") -> str:
        reply = await self.sessions.CreateSession(
            session_pb2.CreateSessionRequest(agent_id="agent-1"), metadata=tenant(tenant_id)
        )
        return str(reply.session.session_id)

    async def get_session(self, session_id: str, tenant_id: str = "acme") -> session_pb2.Session:
        reply = await self.sessions.GetSession(
            session_pb2.GetSessionRequest(session_id=session_id), metadata=tenant(tenant_id)
        )
        session: session_pb2.Session = reply.session
        return session

    def send(
        self, session_id: str, content: str = "hello", tenant_id: str = "acme", **fields: Any
    ) -> Any:
        """A SendMessage call (iterate it, or read() from it)."""
        return self.chat.SendMessage(
            chat_pb2.SendMessageRequest(session_id=session_id, content=content, **fields),
            metadata=tenant(tenant_id),
            timeout=TIMEOUT_S,
        )

    def follow(self, session_id: str, after: int = 0, tenant_id: str = "acme") -> Any:
        return self.chat.StreamSession(
            chat_pb2.StreamSessionRequest(session_id=session_id, after_sequence=after),
            metadata=tenant(tenant_id),
            timeout=TIMEOUT_S,
        )

    async def start_job(self, session_id: str, tenant_id: str = "acme") -> tuple[Any, Event]:
        """Send a message; returns the open call and its accepted event."""
        call = self.send(session_id, tenant_id=tenant_id)
        first = await call.read()
        assert kind_of(first.event) == "accepted"
        await self.dispatcher.next_submit()
        return call, first.event

    async def publish(
        self,
        notices: Sequence[task_update_pb2.PublishUpdatesRequest],
        metadata: Any = None,
        channel: grpc.aio.Channel | None = None,
    ) -> task_update_pb2.PublishUpdatesResponse:
        stub: TaskUpdateServiceAsyncStub = task_update_pb2_grpc.TaskUpdateServiceStub(
            channel or self.channel
        )
        reply: task_update_pb2.PublishUpdatesResponse = await stub.PublishUpdates(
            iter(notices), metadata=metadata or service(), timeout=TIMEOUT_S
        )
        return reply


async def read_events(call: Any, count: int, timeout_s: float = TIMEOUT_S) -> list[Event]:
    """The next ``count`` events of a streaming call."""

    async def collect() -> list[Event]:
        events: list[Event] = []
        while len(events) < count:
            message = await call.read()
            assert message is not EOF, f"stream ended after {events}"
            events.append(message.event)
        return events

    return await asyncio.wait_for(collect(), timeout_s)


async def read_to_end(call: Any, timeout_s: float = TIMEOUT_S) -> list[Event]:
    async def collect() -> list[Event]:
        events: list[Event] = []
        while (message := await call.read()) is not EOF:
            events.append(message.event)
        return events

    return await asyncio.wait_for(collect(), timeout_s)

"""orchestrator.v1.ChatService."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import grpc

from domain.chat import ChatMessage, ChatOrchestrator
from domain.jobs import IfBusy, SessionEvent
from handlers.batch_converters import priority_from_pb
from handlers.call_context import call_context
from handlers.converters import enum_from_pb
from handlers.errors import stream_errors, unary_errors
from handlers.event_converters import event_to_pb, sendable_event, work_kind_from_pb
from handlers.request_context import current_caller
from orchestrator.v1 import chat_pb2, chat_pb2_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]


_IF_BUSY_FROM_PB = {
    chat_pb2.BUSY_POLICY_UNSPECIFIED: IfBusy.HOLD,
    chat_pb2.BUSY_POLICY_QUEUE: IfBusy.HOLD,
    chat_pb2.BUSY_POLICY_REJECT: IfBusy.REJECT,
}


def if_busy_from_pb(policy: chat_pb2.BusyPolicy.ValueType) -> IfBusy:
    return enum_from_pb(_IF_BUSY_FROM_PB, policy, "busy_policy", "value")


class ResponseCache:
    """The StreamSession response of recent events, built once and shared by every stream
    that sends the same event object (the fan-out hands one object to all followers of a
    session). Keyed by identity and holding the event, so a key is never reused while cached;
    the shared message is never mutated after it is built."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._items: OrderedDict[
            int, tuple[SessionEvent, chat_pb2.StreamSessionResponse | None]
        ] = OrderedDict()

    def response(self, event: SessionEvent) -> chat_pb2.StreamSessionResponse | None:
        """None for an event clients do not see (handlers.event_converters.sendable_event)."""
        key = id(event)
        cached = self._items.get(key)
        if cached is not None and cached[0] is event:
            return cached[1]
        pb = sendable_event(event)
        response = None if pb is None else chat_pb2.StreamSessionResponse(event=pb)
        self._items[key] = (event, response)
        if len(self._items) > self._size:
            self._items.popitem(last=False)
        return response


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    """Thin adapter over domain.chat.ChatOrchestrator."""

    def __init__(self, chat: ChatOrchestrator) -> None:
        self._chat = chat
        self._responses = ResponseCache()

    @stream_errors
    async def SendMessage(
        self, request: chat_pb2.SendMessageRequest, context: Ctx
    ) -> AsyncIterator[chat_pb2.SendMessageResponse]:
        message = ChatMessage(
            session_id=request.session_id,
            content=request.content,
            kind=work_kind_from_pb(request.kind),
            model=request.model,
            collections=tuple(request.collections),
            if_busy=if_busy_from_pb(request.busy_policy),
            background=request.background,
            priority=priority_from_pb(request.priority),
        )
        async for event in self._chat.send(call_context(context), message):
            pb = sendable_event(event)
            if pb is not None:
                yield chat_pb2.SendMessageResponse(event=pb)

    @stream_errors
    async def StreamSession(
        self, request: chat_pb2.StreamSessionRequest, context: Ctx
    ) -> AsyncIterator[chat_pb2.StreamSessionResponse]:
        tenant_id = current_caller().tenant_id
        responses = self._responses
        async for event in self._chat.follow(tenant_id, request.session_id, request.after_sequence):
            response = responses.response(event)
            if response is not None:
                yield response

    @unary_errors
    async def CancelJob(
        self, request: chat_pb2.CancelJobRequest, context: Ctx
    ) -> chat_pb2.CancelJobResponse:
        event = await self._chat.cancel(call_context(context), request.session_id, request.job_id)
        return chat_pb2.CancelJobResponse(event=event_to_pb(event))

"""orchestrator.v1.ChatService."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc

from domain.chat import ChatMessage, ChatOrchestrator
from domain.jobs import IfBusy, SessionEvent
from handlers.batch_converters import priority_from_pb
from handlers.call_context import Ctx, call_context
from handlers.converters import enum_from_pb
from handlers.errors import stream_errors, unary_errors
from handlers.event_converters import event_to_pb, sendable_event, work_kind_from_pb
from handlers.request_context import current_caller
from orchestrator.v1 import chat_pb2, chat_pb2_grpc

_IF_BUSY_FROM_PB = {
    chat_pb2.BUSY_POLICY_UNSPECIFIED: IfBusy.HOLD,
    chat_pb2.BUSY_POLICY_QUEUE: IfBusy.HOLD,
    chat_pb2.BUSY_POLICY_REJECT: IfBusy.REJECT,
}


def if_busy_from_pb(policy: chat_pb2.BusyPolicy.ValueType) -> IfBusy:
    return enum_from_pb(_IF_BUSY_FROM_PB, policy, "busy_policy", "value")


class ResponseCache:
    """The encoded StreamSession response of recent events, built and serialized once and
    shared by every stream that sends the same event object (the fan-out hands one object to
    all followers of a session): StreamSession is registered to send these bytes as they are
    (``add_chat_service``). Keyed by identity and holding the event, so a key is never reused
    while cached."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._items: OrderedDict[int, tuple[SessionEvent, bytes | None]] = OrderedDict()

    def response(self, event: SessionEvent) -> bytes | None:
        """None for an event clients do not see (handlers.event_converters.sendable_event)."""
        key = id(event)
        cached = self._items.get(key)
        if cached is not None and cached[0] is event:
            return cached[1]
        pb = sendable_event(event)
        response = (
            None if pb is None else chat_pb2.StreamSessionResponse(event=pb).SerializeToString()
        )
        self._items[key] = (event, response)
        if len(self._items) > self._size:
            self._items.popitem(last=False)
        return response


def _encoded(response: bytes | chat_pb2.StreamSessionResponse) -> bytes:
    """StreamSession's response serializer: what the handler yields is already encoded."""
    if isinstance(response, bytes):
        return response
    return response.SerializeToString()


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
    def StreamSession(  # type: ignore[override]  # encoded responses: add_chat_service
        self, request: chat_pb2.StreamSessionRequest, context: Ctx
    ) -> AsyncIterator[bytes]:
        """Each StreamSessionResponse encoded (``add_chat_service``). Not a generator of its
        own: the domain's yields the encoded responses (every open stream holds its frames)."""
        return self._chat.follow(
            current_caller().tenant_id,
            request.session_id,
            request.after_sequence,
            self._responses.response,
        )

    @unary_errors
    async def CancelJob(
        self, request: chat_pb2.CancelJobRequest, context: Ctx
    ) -> chat_pb2.CancelJobResponse:
        event = await self._chat.cancel(call_context(context), request.session_id, request.job_id)
        return chat_pb2.CancelJobResponse(event=event_to_pb(event))


class _Collected:
    """Stands in for a server to take the method handlers a generated ``add_*`` function
    registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.handlers = dict(handlers)


CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name


def add_chat_service(servicer: ChatServicer, server: Any) -> None:
    """``chat_pb2_grpc.add_ChatServiceServicer_to_server``, except that StreamSession sends
    the bytes its handler yields as they are: an event is encoded once for all its streams
    (ResponseCache), not once per stream. ``server`` is a grpc.aio.Server or anything that
    stands in for one (server.edge.EdgeRegistrar)."""
    collected = _Collected()
    chat_pb2_grpc.add_ChatServiceServicer_to_server(servicer, cast(Any, collected))
    handlers = collected.handlers
    handlers["StreamSession"] = handlers["StreamSession"]._replace(response_serializer=_encoded)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(CHAT_SERVICE, handlers),))
    server.add_registered_method_handlers(CHAT_SERVICE, handlers)

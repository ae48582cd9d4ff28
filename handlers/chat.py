"""orchestrator.v1.ChatService."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from domain.chat import ChatMessage, ChatOrchestrator
from domain.identity import current_caller
from handlers.call_context import call_context
from handlers.errors import stream_errors, unary_errors
from handlers.event_converters import event_to_pb, work_kind_from_pb
from orchestrator.v1 import chat_pb2, chat_pb2_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    """Thin adapter over domain.chat.ChatOrchestrator."""

    def __init__(self, chat: ChatOrchestrator) -> None:
        self._chat = chat

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
            reject_if_busy=request.busy_policy == chat_pb2.BUSY_POLICY_REJECT,
        )
        async for event in self._chat.send(call_context(context), message):
            yield chat_pb2.SendMessageResponse(event=event_to_pb(event))

    @stream_errors
    async def StreamSession(
        self, request: chat_pb2.StreamSessionRequest, context: Ctx
    ) -> AsyncIterator[chat_pb2.StreamSessionResponse]:
        tenant_id = current_caller().tenant_id
        async for event in self._chat.follow(tenant_id, request.session_id, request.after_sequence):
            yield chat_pb2.StreamSessionResponse(event=event_to_pb(event))

    @unary_errors
    async def CancelJob(
        self, request: chat_pb2.CancelJobRequest, context: Ctx
    ) -> chat_pb2.CancelJobResponse:
        event = await self._chat.cancel(call_context(context), request.session_id, request.job_id)
        return chat_pb2.CancelJobResponse(event=event_to_pb(event))

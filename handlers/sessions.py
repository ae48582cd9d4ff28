"""orchestrator.v1.SessionService."""

from __future__ import annotations

from domain.sessions import SessionManager
from handlers.call_context import Ctx, call_context
from handlers.converters import (
    history_page_to_pb,
    optional_duration_ms,
    session_state_from_pb,
    session_to_pb,
)
from handlers.errors import unary_errors
from handlers.request_context import current_caller
from orchestrator.v1 import session_pb2, session_pb2_grpc


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    """Thin adapter over domain.sessions.SessionManager."""

    def __init__(self, sessions: SessionManager) -> None:
        self._sessions = sessions

    @unary_errors
    async def CreateSession(
        self, request: session_pb2.CreateSessionRequest, context: Ctx
    ) -> session_pb2.CreateSessionResponse:
        session = await self._sessions.create(
            current_caller().tenant_id,
            agent_id=request.agent_id,
            user_id=request.user_id,
            metadata=dict(request.metadata),
            ttl_ms=optional_duration_ms(request, "ttl", request.ttl),
            ctx=call_context(context),
        )
        return session_pb2.CreateSessionResponse(session=session_to_pb(session))

    @unary_errors
    async def GetSession(
        self, request: session_pb2.GetSessionRequest, context: Ctx
    ) -> session_pb2.GetSessionResponse:
        session = await self._sessions.get(current_caller().tenant_id, request.session_id)
        return session_pb2.GetSessionResponse(session=session_to_pb(session))

    @unary_errors
    async def ListSessions(
        self, request: session_pb2.ListSessionsRequest, context: Ctx
    ) -> session_pb2.ListSessionsResponse:
        page = await self._sessions.list(
            current_caller().tenant_id,
            page_size=request.page_size,
            page_token=request.page_token,
            state=session_state_from_pb(request.state),
            agent_id=request.agent_id or None,
        )
        return session_pb2.ListSessionsResponse(
            sessions=[session_to_pb(s) for s in page.items],
            next_page_token=page.next_cursor or "",
        )

    @unary_errors
    async def CloseSession(
        self, request: session_pb2.CloseSessionRequest, context: Ctx
    ) -> session_pb2.CloseSessionResponse:
        session = await self._sessions.close(current_caller().tenant_id, request.session_id)
        return session_pb2.CloseSessionResponse(session=session_to_pb(session))

    @unary_errors
    async def ListHistory(
        self, request: session_pb2.ListHistoryRequest, context: Ctx
    ) -> session_pb2.ListHistoryResponse:
        page = await self._sessions.list_history(
            call_context(context),
            request.session_id,
            page_size=request.page_size,
            page_token=request.page_token,
            last_turns=request.last_turns,
            token_budget=request.token_budget,
        )
        return history_page_to_pb(page)

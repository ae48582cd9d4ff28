"""Session rules: validation, limits, pagination tokens, and the state checks callers rely on."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from domain.conversation import HistoryPage
from domain.dispatch import CallContext, DownstreamError
from domain.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from domain.history import encode_history_token, history_query
from domain.ids import is_resource_id, new_id, open_page_token, require_id, seal_page_token
from domain.models import (
    NewSession,
    Page,
    Service,
    Session,
    SessionFilter,
    SessionState,
    page_limit,
)
from domain.ports.platform import AgentDirectory, ConversationStore
from domain.ports.sessions import SessionStore

MAX_ID_CHARS = 128
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY_CHARS = 128
MAX_METADATA_VALUE_CHARS = 1024


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """Configured session limits, in milliseconds."""

    default_ttl_ms: int
    max_ttl_ms: int
    min_ttl_ms: int = 1000


def metadata_violations(metadata: Mapping[str, str]) -> list[FieldViolation]:
    """What is wrong with client metadata (of a session or a batch): too many entries, an
    empty or long key, a long value."""
    violations: list[FieldViolation] = []
    if len(metadata) > MAX_METADATA_ENTRIES:
        violations.append(
            FieldViolation("metadata", f"has more than {MAX_METADATA_ENTRIES} entries")
        )
    for key, value in metadata.items():
        if not key or len(key) > MAX_METADATA_KEY_CHARS:
            detail = f"key must be 1 to {MAX_METADATA_KEY_CHARS} characters"
        elif len(value) > MAX_METADATA_VALUE_CHARS:
            detail = f"value exceeds {MAX_METADATA_VALUE_CHARS} characters"
        else:
            continue
        violations.append(FieldViolation(f"metadata[{key!r}]", detail))
    return violations


def require_session_id(value: str, field: str = "session_id") -> str:
    """Validate a session id argument (presence and shape)."""
    return require_id(value, field, "session id")


def unavailable(service: Service, error: DownstreamError) -> Unavailable:
    """A platform service that could not answer, named in the status message."""
    return Unavailable(f"{service.value} service unavailable ({error.code}): {error.message}")


class SessionManager:
    """Creates, reads, lists and closes sessions for one tenant at a time, and lists their
    conversations.

    With ``agents`` (the server gives the cached directory, domain.agent_directory, unless
    ORCH_AGENT_CHECK is false: tests of the session and chat rules that run no Agent
    Management), a client's CreateSession must name an agent of its tenant; without it any
    agent id is taken as given. ListHistory asks ``conversation``."""

    def __init__(
        self,
        store: SessionStore,
        policy: SessionPolicy,
        *,
        conversation: ConversationStore,
        agents: AgentDirectory | None = None,
    ) -> None:
        self._store = store
        self._policy = policy
        self._agents = agents
        self._conversation = conversation

    async def create(
        self,
        tenant_id: str,
        *,
        agent_id: str,
        user_id: str,
        metadata: Mapping[str, str],
        ttl_ms: int | None,
        ctx: CallContext | None = None,
    ) -> Session:
        """A new session. With ``ctx`` (a client's CreateSession) the agent must exist:
        NotFound naming it otherwise, Unavailable when Agent Management cannot say and the
        agent is not cached. Sessions the service makes for itself (a batch's) pass none."""
        new = self._validate_new(agent_id, user_id, metadata, ttl_ms)
        if ctx is not None and self._agents is not None:
            await self._require_agent(agent_id, ctx)
        return await self._store.create_session(tenant_id, new_id(), new)

    async def _require_agent(self, agent_id: str, ctx: CallContext) -> None:
        assert self._agents is not None
        try:
            agent = await self._agents.get_agent(agent_id, ctx)
        except DownstreamError as exc:
            raise unavailable(Service.AGENT_MANAGEMENT, exc) from exc
        if agent is None:
            raise NotFound(f"agent {agent_id} not found for tenant {ctx.tenant_id}")

    async def list_history(
        self,
        ctx: CallContext,
        session_id: str,
        *,
        page_size: int,
        page_token: str,
        last_turns: int,
        token_budget: int,
    ) -> HistoryPage:
        """One page of the session's conversation (Conversation keeps it), oldest first, within
        the window counted from the newest turn. NotFound for another tenant's session."""
        require_session_id(session_id)
        query = history_query(
            session_id,
            page_size=page_size,
            page_token=page_token,
            last_turns=last_turns,
            token_budget=token_budget,
        )
        if await self._store.get_session(ctx.tenant_id, session_id, touch=False) is None:
            raise NotFound(f"session {session_id} not found")
        try:
            page = await self._conversation.list_history(
                session_id,
                ctx,
                window=query.window,
                page_size=query.page_size,
                page_token=query.downstream_token,
            )
        except DownstreamError as exc:
            raise unavailable(Service.CONVERSATION, exc) from exc
        token = encode_history_token(page.next_page_token, session_id, query.window)
        return HistoryPage(page.turns, token)

    async def get(self, tenant_id: str, session_id: str) -> Session:
        """Read a session, sliding its expiry. NotFound for missing and other tenants' ids."""
        require_session_id(session_id)
        session = await self._store.get_session(tenant_id, session_id, touch=True)
        if session is None:
            raise NotFound(f"session {session_id} not found")
        return session

    async def peek(self, tenant_id: str, session_id: str) -> Session | None:
        """Read a session without sliding its expiry (for followers); None when gone."""
        return await self._store.get_session(tenant_id, session_id, touch=False)

    async def get_open(self, tenant_id: str, session_id: str) -> Session:
        """Read a session that must accept new work (ACTIVE or BUSY)."""
        session = await self.get(tenant_id, session_id)
        if not session.state.is_open:
            raise FailedPrecondition(f"session {session_id} is {session.state.value}")
        return session

    async def list(
        self,
        tenant_id: str,
        *,
        page_size: int,
        page_token: str,
        state: SessionState | None,
        agent_id: str | None,
    ) -> Page[Session]:
        limit = page_limit(page_size)
        filter = SessionFilter(state=state, agent_id=agent_id or None)
        after = decode_page_token(page_token, filter) if page_token else None
        page = await self._store.list_sessions(tenant_id, limit=limit, after=after, filter=filter)
        token = encode_page_token(page.next_cursor, filter) if page.next_cursor else None
        return Page(page.items, token)

    async def close(self, tenant_id: str, session_id: str) -> Session:
        require_session_id(session_id)
        session = await self._store.close_session(tenant_id, session_id)
        if session is None:
            raise NotFound(f"session {session_id} not found")
        if session.state is SessionState.EXPIRED:
            raise FailedPrecondition(f"session {session_id} is expired")
        return session

    def _validate_new(
        self, agent_id: str, user_id: str, metadata: Mapping[str, str], ttl_ms: int | None
    ) -> NewSession:
        violations: list[FieldViolation] = []
        if not agent_id:
            violations.append(FieldViolation("agent_id", "is required"))
        elif len(agent_id) > MAX_ID_CHARS:
            violations.append(FieldViolation("agent_id", f"exceeds {MAX_ID_CHARS} characters"))
        if len(user_id) > MAX_ID_CHARS:
            violations.append(FieldViolation("user_id", f"exceeds {MAX_ID_CHARS} characters"))
        violations.extend(metadata_violations(metadata))
        policy = self._policy
        if ttl_ms is None:
            ttl_ms = policy.default_ttl_ms
        elif not policy.min_ttl_ms <= ttl_ms <= policy.max_ttl_ms:
            violations.append(
                FieldViolation(
                    "ttl",
                    f"must be between {policy.min_ttl_ms / 1000:g}s and "
                    f"{policy.max_ttl_ms / 1000:g}s",
                )
            )
        if violations:
            raise InvalidArgument(violations)
        return NewSession(
            agent_id=agent_id, user_id=user_id, metadata=dict(metadata), ttl_ms=ttl_ms
        )


def _filter_fingerprint(filter: SessionFilter) -> str:
    raw = f"{filter.state.value if filter.state else ''}\x00{filter.agent_id or ''}"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def encode_page_token(cursor: str, filter: SessionFilter) -> str:
    """An opaque token that carries the cursor and the filter it is valid for."""
    return seal_page_token({"v": 1, "after": cursor, "f": _filter_fingerprint(filter)})


def decode_page_token(token: str, filter: SessionFilter) -> str:
    """The cursor inside a page token; InvalidArgument for a forged, stale or foreign token."""
    after, fingerprint = open_page_token(token, "after", "f")
    if not isinstance(after, str) or not is_resource_id(after):
        raise InvalidArgument.field("page_token", "is not a valid page token")
    if fingerprint != _filter_fingerprint(filter):
        raise InvalidArgument.field("page_token", "was issued for different filters")
    return after

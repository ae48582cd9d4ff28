"""Domain objects shared by the layers: plain, immutable, storage-agnostic."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from domain.errors import InvalidArgument

T = TypeVar("T")


class SessionState(enum.StrEnum):
    """Lifecycle of a session. ACTIVE and BUSY are open; CLOSED and EXPIRED are final."""

    ACTIVE = "active"
    BUSY = "busy"
    CLOSED = "closed"
    EXPIRED = "expired"

    @property
    def is_open(self) -> bool:
        return self in (SessionState.ACTIVE, SessionState.BUSY)


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Token counts of one job, or totals over many."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.total_tokens + other.total_tokens,
        )


@dataclass(frozen=True, slots=True)
class NewSession:
    """What a caller asks for when creating a session (already validated)."""

    agent_id: str
    user_id: str
    metadata: Mapping[str, str]
    ttl_ms: int
    # Kept out of the tenant's session index (ListSessions): the sessions the orchestrator
    # makes for a job's internal calls (domain.internal_calls).
    hidden: bool = False


@dataclass(frozen=True, slots=True)
class Session:
    """A session as stored. Times are Unix milliseconds."""

    session_id: str
    tenant_id: str
    agent_id: str
    user_id: str
    state: SessionState
    metadata: Mapping[str, str]
    created_at_ms: int
    updated_at_ms: int
    expires_at_ms: int
    ttl_ms: int
    pending_job_ids: tuple[str, ...] = ()
    message_count: int = 0
    usage: TokenUsage = field(default_factory=TokenUsage)


@dataclass(frozen=True, slots=True)
class SessionFilter:
    """ListSessions filters; None means "any"."""

    state: SessionState | None = None
    agent_id: str | None = None

    def matches(self, session: Session) -> bool:
        if self.state is not None and session.state is not self.state:
            return False
        return self.agent_id is None or session.agent_id == self.agent_id


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing; ``next_cursor`` is None on the last page."""

    items: list[T]
    next_cursor: str | None


DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_limit(page_size: int) -> int:
    """How many items one page of a listing holds for the requested ``page_size`` (0: the
    default), bounded."""
    if page_size < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


class WorkKind(enum.StrEnum):
    """The kind of work a request asks for (orchestrator.v1.WorkKind)."""

    LLM_QUERY = "llm_query"
    RAG_QUERY = "rag_query"
    EMBEDDING = "embedding"


class Service(enum.StrEnum):
    """A downstream service that runs jobs and reports back (orchestrator.v1.Service)."""

    QUERY = "query"
    EMBEDDING = "embedding"
    # The platform services a plan calls (domain.plans). Agent Execution and Workflow Engine run
    # jobs and report back like Query; the other three answer synchronously.
    AGENT_EXECUTION = "agent_execution"
    WORKFLOW_ENGINE = "workflow_engine"
    CONVERSATION = "conversation"
    AGENT_MANAGEMENT = "agent_management"
    TOOL_REGISTRY = "tool_registry"

    @classmethod
    def for_kind(cls, kind: WorkKind) -> Service:
        """Query handles LLM and RAG work; Embedding handles embeddings."""
        return cls.EMBEDDING if kind is WorkKind.EMBEDDING else cls.QUERY

"""Protobuf <-> domain conversions. Pure functions, no I/O."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Protocol, TypeVar

from google.protobuf import duration_pb2, timestamp_pb2

from domain.conversation import HistoryPage, Turn, TurnRole
from domain.errors import InvalidArgument
from domain.models import Session, SessionState, TokenUsage
from orchestrator.v1 import common_pb2, session_pb2

Number = TypeVar("Number", bound=int)
Value = TypeVar("Value")
Member = TypeVar("Member", bound=enum.Enum)
_Number_co = TypeVar("_Number_co", bound=int, covariant=True)


class PbEnum(Protocol[_Number_co]):
    """A generated protobuf enum (``session_pb2.SessionState``)."""

    def Value(self, name: str) -> _Number_co: ...


def enum_to_pb(
    domain: type[Member],
    pb: PbEnum[Number],
    prefix: str,
    members: Iterable[Member] | None = None,
) -> dict[Member, Number]:
    """Each member of the ``domain`` enum (or just ``members``) -> the number of the ``pb``
    enum value named ``prefix`` + the member's name (SessionState.ACTIVE ->
    SESSION_STATE_ACTIVE). A member without its value fails at import (ValueError)."""
    return {member: pb.Value(prefix + member.name) for member in members or domain}


def inverse(table: Mapping[Member, Number]) -> dict[Number, Member]:
    return {number: member for member, number in table.items()}


_STATE_TO_PB = enum_to_pb(SessionState, session_pb2.SessionState, "SESSION_STATE_")
_STATE_FROM_PB = inverse(_STATE_TO_PB)
_ROLE_TO_PB = enum_to_pb(TurnRole, session_pb2.TurnRole, "TURN_ROLE_")


def enum_from_pb(table: Mapping[Number, Value], number: Number, field: str, what: str) -> Value:
    """The domain value of a protobuf enum number; InvalidArgument naming ``field`` for a
    number the table does not know (a newer client's, or garbage)."""
    try:
        return table[number]
    except KeyError:
        raise InvalidArgument.field(field, f"unknown {what} {number}") from None


def timestamp_from_ms(ms: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMilliseconds(ms)
    return ts


def duration_from_ms(ms: int) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(ms)
    return duration


def optional_duration_ms(holder: object, field: str, duration: duration_pb2.Duration) -> int | None:
    """Milliseconds of an optional Duration field, None when unset; negative is invalid."""
    if not holder.HasField(field):  # type: ignore[attr-defined]
        return None
    if duration.seconds < 0 or duration.nanos < 0:
        raise InvalidArgument.field(field, "must not be negative")
    return int(duration.ToMilliseconds())


def usage_to_pb(usage: TokenUsage) -> common_pb2.TokenUsage:
    return common_pb2.TokenUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def usage_from_pb(usage: common_pb2.TokenUsage) -> TokenUsage:
    return TokenUsage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


def session_state_from_pb(state: session_pb2.SessionState.ValueType) -> SessionState | None:
    """A filter state: None for UNSPECIFIED; InvalidArgument for unknown numbers."""
    if state == session_pb2.SESSION_STATE_UNSPECIFIED:
        return None
    return enum_from_pb(_STATE_FROM_PB, state, "state", "session state")


def session_to_pb(session: Session) -> session_pb2.Session:
    return session_pb2.Session(
        session_id=session.session_id,
        agent_id=session.agent_id,
        user_id=session.user_id,
        state=_STATE_TO_PB[session.state],
        metadata=dict(session.metadata),
        create_time=timestamp_from_ms(session.created_at_ms),
        update_time=timestamp_from_ms(session.updated_at_ms),
        expire_time=timestamp_from_ms(session.expires_at_ms),
        pending_job_ids=list(session.pending_job_ids),
        message_count=session.message_count,
        token_usage=usage_to_pb(session.usage),
        ttl=duration_from_ms(session.ttl_ms),
    )


def turn_to_pb(turn: Turn) -> session_pb2.ConversationTurn:
    """A conversation turn as clients see it (``time`` unset when Conversation gave none)."""
    message = session_pb2.ConversationTurn(
        role=_ROLE_TO_PB[turn.role],
        content=turn.content,
        job_id=turn.job_id,
        tokens=turn.tokens,
    )
    if turn.time_ms:
        message.time.CopyFrom(timestamp_from_ms(turn.time_ms))
    return message


def history_page_to_pb(page: HistoryPage) -> session_pb2.ListHistoryResponse:
    return session_pb2.ListHistoryResponse(
        turns=[turn_to_pb(turn) for turn in page.turns], next_page_token=page.next_page_token
    )

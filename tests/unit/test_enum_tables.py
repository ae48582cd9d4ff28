"""handlers.converters.enum_to_pb: domain enums map to protobuf values by name."""

from __future__ import annotations

import enum

import pytest

from domain.batch_models import BatchState
from domain.models import SessionState
from handlers.converters import enum_to_pb, inverse
from orchestrator.v1 import batch_pb2, session_pb2


def test_members_map_to_the_values_of_the_same_name() -> None:
    table = enum_to_pb(SessionState, session_pb2.SessionState, "SESSION_STATE_")
    assert table == {
        SessionState.ACTIVE: session_pb2.SESSION_STATE_ACTIVE,
        SessionState.BUSY: session_pb2.SESSION_STATE_BUSY,
        SessionState.CLOSED: session_pb2.SESSION_STATE_CLOSED,
        SessionState.EXPIRED: session_pb2.SESSION_STATE_EXPIRED,
    }
    assert inverse(table)[session_pb2.SESSION_STATE_BUSY] is SessionState.BUSY


def test_every_member_is_mapped_and_unspecified_is_not() -> None:
    table = enum_to_pb(BatchState, batch_pb2.BatchState, "BATCH_STATE_")
    assert set(table) == set(BatchState)
    assert batch_pb2.BATCH_STATE_UNSPECIFIED not in table.values()


def test_a_member_without_a_protobuf_value_fails() -> None:
    class Extended(enum.Enum):
        ACTIVE = "active"
        PAUSED = "paused"

    with pytest.raises(ValueError, match="SESSION_STATE_PAUSED"):
        enum_to_pb(Extended, session_pb2.SessionState, "SESSION_STATE_")


def test_only_the_members_asked_for_are_mapped() -> None:
    table = enum_to_pb(
        SessionState, session_pb2.SessionState, "SESSION_STATE_", (SessionState.ACTIVE,)
    )
    assert table == {SessionState.ACTIVE: session_pb2.SESSION_STATE_ACTIVE}

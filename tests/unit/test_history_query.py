"""ListHistory's checks (domain.history): every bad field named, and page tokens bound to the
session and window they were issued for."""

from __future__ import annotations

import pytest

from domain.conversation import HistoryWindow
from domain.errors import InvalidArgument
from domain.history import (
    MAX_LAST_TURNS,
    MAX_TOKEN_BUDGET,
    HistoryQuery,
    encode_history_token,
    history_query,
)
from domain.ids import new_id

SESSION = new_id()


def query(
    *, page_size: int = 0, page_token: str = "", last_turns: int = 0, token_budget: int = 0
) -> HistoryQuery:
    return history_query(
        SESSION,
        page_size=page_size,
        page_token=page_token,
        last_turns=last_turns,
        token_budget=token_budget,
    )


def test_defaults_list_every_turn_in_pages_of_fifty() -> None:
    checked = query()
    assert (checked.window, checked.page_size, checked.downstream_token) == (None, 50, "")
    windowed = query(page_size=5000, last_turns=3, token_budget=9)
    assert windowed.window == HistoryWindow(3, 9)
    assert windowed.page_size == 1000


def test_every_bad_field_is_named_at_once() -> None:
    with pytest.raises(InvalidArgument) as raised:
        query(page_size=-1, last_turns=-1, token_budget=MAX_TOKEN_BUDGET + 1)
    assert {v.field for v in raised.value.violations} == {
        "page_size",
        "last_turns",
        "token_budget",
    }
    with pytest.raises(InvalidArgument, match="last_turns"):
        query(last_turns=MAX_LAST_TURNS + 1)


def test_a_token_round_trips_for_its_session_and_window_only() -> None:
    window = HistoryWindow(last_turns=10)
    token = encode_history_token("cursor-7", SESSION, window)
    assert query(page_token=token, last_turns=10).downstream_token == "cursor-7"
    with pytest.raises(InvalidArgument, match="another session or window"):
        query(page_token=token, last_turns=11)
    with pytest.raises(InvalidArgument, match="another session or window"):
        history_query(new_id(), page_size=0, page_token=token, last_turns=10, token_budget=0)
    assert encode_history_token("", SESSION, window) == ""


@pytest.mark.parametrize("token", ["garbage", "e30", "eyJ0IjogMX0"])
def test_a_forged_token_is_invalid(token: str) -> None:
    with pytest.raises(InvalidArgument, match="page_token: is not a valid page token"):
        query(page_token=token)

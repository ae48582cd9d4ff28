"""A session's conversation as SessionService.ListHistory lists it: the window and page checks,
and the page token, which wraps Conversation's own token with the session and window it was
issued for (a token from another session or window is INVALID_ARGUMENT here, whatever the
Conversation service would make of it)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from domain.conversation import HistoryWindow
from domain.errors import FieldViolation, InvalidArgument
from domain.ids import open_page_token, seal_page_token
from domain.models import page_limit

MAX_LAST_TURNS = 10_000
MAX_TOKEN_BUDGET = 100_000_000
# Conversation's own token inside ours: as much as a page token of this service may carry.
MAX_DOWNSTREAM_TOKEN_CHARS = 2048


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    """A checked ListHistory request: the window (None: every turn), the page size and
    Conversation's page token ("" for the first page)."""

    session_id: str
    window: HistoryWindow | None
    page_size: int
    downstream_token: str


def history_query(
    session_id: str, *, page_size: int, page_token: str, last_turns: int, token_budget: int
) -> HistoryQuery:
    """InvalidArgument naming every bad field of a ListHistory request (the session id is
    checked before)."""
    violations: list[FieldViolation] = []
    if not 0 <= last_turns <= MAX_LAST_TURNS:
        violations.append(FieldViolation("last_turns", f"must be from 0 to {MAX_LAST_TURNS}"))
    if not 0 <= token_budget <= MAX_TOKEN_BUDGET:
        violations.append(FieldViolation("token_budget", f"must be from 0 to {MAX_TOKEN_BUDGET}"))
    limit = 0
    try:
        limit = page_limit(page_size)
    except InvalidArgument as exc:
        violations.extend(exc.violations)
    if violations:
        raise InvalidArgument(violations)
    window = HistoryWindow(last_turns, token_budget) if last_turns or token_budget else None
    downstream = decode_history_token(page_token, session_id, window) if page_token else ""
    return HistoryQuery(session_id, window, limit, downstream)


def _fingerprint(session_id: str, window: HistoryWindow | None) -> str:
    turns, tokens = (window.last_turns, window.token_budget) if window else (0, 0)
    raw = f"{session_id}\x00{turns}\x00{tokens}"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def encode_history_token(downstream: str, session_id: str, window: HistoryWindow | None) -> str:
    """Our page token for Conversation's ``downstream`` token ("" stays "": the last page)."""
    if not downstream:
        return ""
    return seal_page_token({"v": 1, "t": downstream, "f": _fingerprint(session_id, window)})


def decode_history_token(token: str, session_id: str, window: HistoryWindow | None) -> str:
    """Conversation's token inside ``token``; InvalidArgument for a forged token or one issued
    for another session or window."""
    downstream, fingerprint = open_page_token(token, "t", "f")
    if not isinstance(downstream, str) or not 0 < len(downstream) <= MAX_DOWNSTREAM_TOKEN_CHARS:
        raise InvalidArgument.field("page_token", "is not a valid page token")
    if fingerprint != _fingerprint(session_id, window):
        raise InvalidArgument.field("page_token", "was issued for another session or window")
    return downstream

"""The reference Conversation Service: each session's turns in memory, per (tenant, session).

Appends are idempotent by job id. ListHistory takes a window counted from the newest turn (the
last N turns, a token budget, or both) and pages through it oldest first. A page token pins the
window the first page chose (by the turns' positions), so turns appended meanwhile neither shift
nor repeat what the later pages return; it is bound to its tenant and session.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from google.protobuf import timestamp_pb2

from conversation.v1 import conversation_pb2, conversation_pb2_grpc
from reference import fields
from reference.fields import InvalidField
from reference.tools import Clock, system_clock

if TYPE_CHECKING:
    from reference.fields import Context

# Memory bounds: the newest turns of a session kept, and sessions kept (least recently
# appended to dropped first).
MAX_TURNS_PER_SESSION = 10_000
MAX_SESSIONS = 100_000
# Turns one append may carry (a job adds its user message and the reply).
MAX_APPEND_TURNS = 16
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_PAGE_TOKEN_CHARS = 512
MAX_WINDOW = 2**31 - 1


@dataclass(slots=True)
class _Session:
    turns: deque[tuple[int, conversation_pb2.Turn]] = field(default_factory=deque)
    jobs: OrderedDict[str, None] = field(default_factory=OrderedDict)
    next_position: int = 0

    @property
    def first_position(self) -> int:
        return self.turns[0][0] if self.turns else self.next_position


@dataclass(frozen=True, slots=True)
class Page:
    turns: list[conversation_pb2.Turn]
    next_page_token: str


class BadPageToken(InvalidField):
    def __init__(self) -> None:
        super().__init__("page_token", "is not a token of this session's history")


def _key_digest(tenant_id: str, session_id: str) -> str:
    return hashlib.sha256(f"{tenant_id}\0{session_id}".encode()).hexdigest()[:16]


def _encode_token(key: str, next_position: int, end: int) -> str:
    raw = json.dumps({"k": key, "n": next_position, "e": end}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_token(token: str, key: str, limit: int) -> tuple[int, int]:
    """(next position, window end) of a page token of this session; BadPageToken otherwise."""
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        raise BadPageToken
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        decoded = json.loads(raw)
    except (binascii.Error, ValueError):
        raise BadPageToken from None
    if not isinstance(decoded, dict) or decoded.get("k") != key:
        raise BadPageToken
    next_position, end = decoded.get("n"), decoded.get("e")
    if not (type(next_position) is int and type(end) is int and 0 <= next_position < end <= limit):
        raise BadPageToken
    return next_position, end


class ConversationLog:
    """The turns of every (tenant, session), bounded in memory."""

    def __init__(self, clock: Clock = system_clock) -> None:
        self._clock = clock
        self._sessions: OrderedDict[tuple[str, str], _Session] = OrderedDict()

    def append(
        self, tenant_id: str, session_id: str, job_id: str, turns: Sequence[conversation_pb2.Turn]
    ) -> bool:
        """Store a job's turns unless that job's turns are stored already; whether it did."""
        key = (tenant_id, session_id)
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = _Session()
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        self._sessions.move_to_end(key)
        if job_id in session.jobs:
            return False
        now = timestamp_pb2.Timestamp()
        now.FromDatetime(self._clock())
        for turn in turns:
            stored = conversation_pb2.Turn()
            stored.CopyFrom(turn)
            stored.job_id = stored.job_id or job_id
            stored.tokens = fields.turn_tokens(turn)
            if not stored.HasField("time"):
                stored.time.CopyFrom(now)
            session.turns.append((session.next_position, stored))
            session.next_position += 1
        session.jobs[job_id] = None
        while len(session.turns) > MAX_TURNS_PER_SESSION:
            session.turns.popleft()
        while len(session.jobs) > MAX_TURNS_PER_SESSION:
            session.jobs.popitem(last=False)
        return True

    def list(
        self,
        tenant_id: str,
        session_id: str,
        *,
        last_turns: int = 0,
        token_budget: int = 0,
        page_size: int = 0,
        page_token: str = "",
    ) -> Page:
        """One page of the session's window, oldest first. An unknown session has no turns."""
        session = self._sessions.get((tenant_id, session_id)) or _Session()
        key = _key_digest(tenant_id, session_id)
        size = page_size or DEFAULT_PAGE_SIZE
        if page_token:
            start, end = _decode_token(page_token, key, session.next_position)
        else:
            start, end = self._window(session, last_turns, token_budget), session.next_position
        start = max(start, session.first_position)
        offset = start - session.first_position
        window = itertools.islice(session.turns, offset, offset + size)
        page = [turn for position, turn in window if position < end]
        following = start + len(page)
        token = _encode_token(key, following, end) if following < end else ""
        return Page(page, token)

    @staticmethod
    def _window(session: _Session, last_turns: int, token_budget: int) -> int:
        """The position of the oldest turn in the window."""
        start = session.next_position
        spent = 0
        for taken, (position, turn) in enumerate(reversed(session.turns)):
            if last_turns and taken >= last_turns:
                break
            spent += turn.tokens
            if token_budget and spent > token_budget:
                break
            start = position
        return start


class ConversationServicer(conversation_pb2_grpc.ConversationServiceServicer):
    def __init__(self, log: ConversationLog) -> None:
        self.log = log

    async def AppendTurns(
        self, request: conversation_pb2.AppendTurnsRequest, context: Context
    ) -> conversation_pb2.AppendTurnsResponse:
        async with fields.checked(context):
            fields.idents(request, "tenant_id", "session_id", "job_id")
            fields.idents(request, "request_id", required=False)
            fields.count(request.turns, "turns", minimum=1, maximum=MAX_APPEND_TURNS)
            fields.turns(request.turns, "turns", maximum=MAX_APPEND_TURNS)
        appended = self.log.append(
            request.tenant_id, request.session_id, request.job_id, request.turns
        )
        return conversation_pb2.AppendTurnsResponse(appended=appended)

    async def ListHistory(
        self, request: conversation_pb2.ListHistoryRequest, context: Context
    ) -> conversation_pb2.ListHistoryResponse:
        async with fields.checked(context):
            fields.idents(request, "tenant_id", "session_id")
            fields.number(request.last_turns, "last_turns", maximum=MAX_WINDOW)
            fields.number(request.token_budget, "token_budget", maximum=MAX_WINDOW)
            fields.number(request.page_size, "page_size", maximum=MAX_PAGE_SIZE)
            page = self.log.list(
                request.tenant_id,
                request.session_id,
                last_turns=request.last_turns,
                token_budget=request.token_budget,
                page_size=request.page_size,
                page_token=request.page_token,
            )
        return conversation_pb2.ListHistoryResponse(
            turns=page.turns, next_page_token=page.next_page_token
        )

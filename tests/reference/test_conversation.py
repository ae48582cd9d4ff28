"""The reference Conversation Service over real gRPC: idempotent appends, windows, paging,
tenant isolation and bounds."""

from __future__ import annotations

import base64
import json
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from conversation.v1 import conversation_pb2
from reference import conversation
from reference.conversation import ConversationLog
from tests.reference.conftest import FIXED_NOW, Stack, refused

USER = conversation_pb2.ROLE_USER
ASSISTANT = conversation_pb2.ROLE_ASSISTANT


def exchange(question: str, answer: str) -> list[conversation_pb2.Turn]:
    return [
        conversation_pb2.Turn(role=USER, content=question),
        conversation_pb2.Turn(role=ASSISTANT, content=answer),
    ]


def append(
    tenant: str, session: str, job: str, turns: list[conversation_pb2.Turn]
) -> conversation_pb2.AppendTurnsRequest:
    return conversation_pb2.AppendTurnsRequest(
        tenant_id=tenant, session_id=session, job_id=job, turns=turns
    )


async def fill(stack: Stack, jobs: int, tenant: str = "acme", session: str = "s1") -> None:
    for number in range(1, jobs + 1):
        turns = exchange(f"question {number}", f"answer number {number}")
        reply = await stack.conversation.AppendTurns(
            append(tenant, session, f"job-{number}", turns), timeout=5
        )
        assert reply.appended is True


async def contents(stack: Stack, **window: Any) -> list[str]:
    request = conversation_pb2.ListHistoryRequest(tenant_id="acme", session_id="s1", **window)
    reply = await stack.conversation.ListHistory(request, timeout=5)
    return [turn.content for turn in reply.turns]


async def test_append_is_idempotent_by_job_id_and_stamps_turns(stack: Stack) -> None:
    turns = exchange("hello there", "hi")
    first = await stack.conversation.AppendTurns(append("acme", "s1", "j1", turns), timeout=5)
    again = await stack.conversation.AppendTurns(
        append("acme", "s1", "j1", exchange("other", "text")), timeout=5
    )
    assert (first.appended, again.appended) == (True, False)

    reply = await stack.conversation.ListHistory(
        conversation_pb2.ListHistoryRequest(tenant_id="acme", session_id="s1"), timeout=5
    )
    assert [(t.role, t.content, t.job_id, t.tokens) for t in reply.turns] == [
        (USER, "hello there", "j1", 2),
        (ASSISTANT, "hi", "j1", 1),
    ]
    assert all(
        t.time.ToDatetime().replace(tzinfo=FIXED_NOW.tzinfo) == FIXED_NOW for t in reply.turns
    )
    assert reply.next_page_token == ""


async def test_given_times_and_token_counts_are_kept(stack: Stack) -> None:
    when = timestamp_pb2.Timestamp(seconds=1_700_000_000)
    turn = conversation_pb2.Turn(role=USER, content="a b c", tokens=40, time=when, job_id="x")
    await stack.conversation.AppendTurns(append("acme", "s1", "j1", [turn]), timeout=5)
    reply = await stack.conversation.ListHistory(
        conversation_pb2.ListHistoryRequest(tenant_id="acme", session_id="s1"), timeout=5
    )
    assert reply.turns[0] == turn


async def test_windows_count_from_the_newest_turn(stack: Stack) -> None:
    await fill(stack, 3)  # user turns: 2 tokens, assistant turns: 3 tokens
    everything = await contents(stack)
    assert everything == [
        "question 1",
        "answer number 1",
        "question 2",
        "answer number 2",
        "question 3",
        "answer number 3",
    ]
    assert await contents(stack, last_turns=3) == everything[-3:]
    assert await contents(stack, last_turns=100) == everything
    assert await contents(stack, token_budget=5) == everything[-2:]
    assert await contents(stack, token_budget=7) == everything[-2:]
    assert await contents(stack, token_budget=8) == everything[-3:]
    assert await contents(stack, token_budget=2) == []
    assert await contents(stack, last_turns=2, token_budget=100) == everything[-2:]
    assert await contents(stack, last_turns=5, token_budget=5) == everything[-2:]


async def test_pages_walk_the_window_and_ignore_later_appends(stack: Stack) -> None:
    await fill(stack, 5)
    request = conversation_pb2.ListHistoryRequest(
        tenant_id="acme", session_id="s1", last_turns=7, page_size=3
    )
    seen: list[str] = []
    pages = 0
    while True:
        reply = await stack.conversation.ListHistory(request, timeout=5)
        seen += [turn.content for turn in reply.turns]
        pages += 1
        if pages == 1:  # appended after the first page: not part of this listing
            await stack.conversation.AppendTurns(
                append("acme", "s1", "late", exchange("late", "later")), timeout=5
            )
        if not reply.next_page_token:
            break
        request.page_token = reply.next_page_token
    assert pages == 3
    assert seen == [
        "answer number 2",
        "question 3",
        "answer number 3",
        "question 4",
        "answer number 4",
        "question 5",
        "answer number 5",
    ]


async def test_default_page_size(stack: Stack) -> None:
    await fill(stack, conversation.DEFAULT_PAGE_SIZE)  # twice as many turns as a page
    reply = await stack.conversation.ListHistory(
        conversation_pb2.ListHistoryRequest(tenant_id="acme", session_id="s1"), timeout=5
    )
    assert len(reply.turns) == conversation.DEFAULT_PAGE_SIZE
    assert reply.next_page_token


async def test_tenants_and_sessions_are_isolated(stack: Stack) -> None:
    await fill(stack, 2, tenant="acme", session="s1")
    # The same session id and job id in another tenant is another history.
    other = await stack.conversation.AppendTurns(
        append("globex", "s1", "job-1", exchange("secret", "reply")), timeout=5
    )
    assert other.appended is True
    globex = await stack.conversation.ListHistory(
        conversation_pb2.ListHistoryRequest(tenant_id="globex", session_id="s1"), timeout=5
    )
    assert [t.content for t in globex.turns] == ["secret", "reply"]
    assert "secret" not in await contents(stack)
    empty = await stack.conversation.ListHistory(
        conversation_pb2.ListHistoryRequest(tenant_id="nobody", session_id="s1"), timeout=5
    )
    assert list(empty.turns) == [] and empty.next_page_token == ""

    # A page token of one tenant's session is refused for another tenant or session.
    first = await stack.conversation.ListHistory(
        conversation_pb2.ListHistoryRequest(tenant_id="acme", session_id="s1", page_size=1),
        timeout=5,
    )
    for tenant, session in (("globex", "s1"), ("acme", "s2")):
        request = conversation_pb2.ListHistoryRequest(
            tenant_id=tenant, session_id=session, page_token=first.next_page_token
        )
        await refused(
            stack.conversation.ListHistory(request, timeout=5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "page_token",
        )


def _token(payload: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


@pytest.mark.parametrize(
    "token",
    [
        "not base64 !!",
        "x" * 600,
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        _token([1, 2]),
        _token({"k": "nope", "n": 0, "e": 1}),
    ],
)
async def test_bad_page_tokens_are_invalid_argument(stack: Stack, token: str) -> None:
    await fill(stack, 1)
    request = conversation_pb2.ListHistoryRequest(
        tenant_id="acme", session_id="s1", page_token=token
    )
    await refused(
        stack.conversation.ListHistory(request, timeout=5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "page_token",
    )


def test_forged_positions_are_refused() -> None:
    log = ConversationLog()
    log.append("acme", "s1", "j", exchange("a", "b"))
    token = log.list("acme", "s1", page_size=1).next_page_token
    key = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))["k"]
    for n, e in ((0, 0), (1, 5), (-1, 1), (True, 2), ("0", 2)):
        with pytest.raises(conversation.BadPageToken):
            log.list("acme", "s1", page_token=_token({"k": key, "n": n, "e": e}).rstrip("="))
    assert [t.content for t in log.list("acme", "s1", page_token=token).turns] == ["b"]


def test_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conversation, "MAX_TURNS_PER_SESSION", 4)
    monkeypatch.setattr(conversation, "MAX_SESSIONS", 2)
    log = ConversationLog()
    for number in range(3):
        log.append("acme", "s1", f"j{number}", exchange(f"q{number}", f"a{number}"))
    assert [t.content for t in log.list("acme", "s1").turns] == ["q1", "a1", "q2", "a2"]
    first = log.list("acme", "s1", page_size=1)
    log.append("acme", "s1", "j3", exchange("q3", "a3"))  # the page's next turn is dropped
    assert [t.content for t in log.list("acme", "s1", page_token=first.next_page_token).turns] == [
        "q2",
        "a2",
    ]
    log.append("acme", "s2", "j", exchange("x", "y"))
    log.append("acme", "s3", "j", exchange("x", "y"))  # s1 is the least recently appended to
    assert log.list("acme", "s1").turns == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"tenant_id": ""}, "tenant_id"),
        ({"session_id": ""}, "session_id"),
        ({"job_id": ""}, "job_id"),
        ({"tenant_id": "t" * 1025}, "tenant_id"),
        ({"request_id": "r" * 1025}, "request_id"),
        ({"turns": []}, "turns"),
        ({"turns": exchange("a", "b") * 9}, "turns"),
        ({"turns": [conversation_pb2.Turn(content="no role")]}, "turns[0].role"),
        ({"turns": [conversation_pb2.Turn(role=USER, tokens=-1)]}, "turns[0].tokens"),
        (
            {"turns": [conversation_pb2.Turn(role=USER, content="x" * (1024 * 1024 + 1))]},
            "turns[0].content",
        ),
        (
            {"turns": [conversation_pb2.Turn(role=USER, job_id="j" * 1025)]},
            "turns[0].job_id",
        ),
        (
            {"turns": [conversation_pb2.Turn(role=USER, time=timestamp_pb2.Timestamp(seconds=-5))]},
            "turns[0].time",
        ),
    ],
)
async def test_append_bounds(stack: Stack, change: dict[str, Any], field: str) -> None:
    request = append("acme", "s1", "j1", exchange("q", "a"))
    for name, value in change.items():
        request.ClearField(name)  # type: ignore[arg-type]
        if isinstance(value, list):
            getattr(request, name).extend(value)
        else:
            setattr(request, name, value)
    await refused(
        stack.conversation.AppendTurns(request, timeout=5), grpc.StatusCode.INVALID_ARGUMENT, field
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"tenant_id": ""}, "tenant_id"),
        ({"session_id": ""}, "session_id"),
        ({"session_id": "s" * 1025}, "session_id"),
        ({"last_turns": -1}, "last_turns"),
        ({"token_budget": -1}, "token_budget"),
        ({"page_size": -1}, "page_size"),
        ({"page_size": 1001}, "page_size"),
    ],
)
async def test_list_bounds(stack: Stack, change: dict[str, Any], field: str) -> None:
    request = conversation_pb2.ListHistoryRequest(tenant_id="acme", session_id="s1")
    for name, value in change.items():
        setattr(request, name, value)
    await refused(
        stack.conversation.ListHistory(request, timeout=5), grpc.StatusCode.INVALID_ARGUMENT, field
    )

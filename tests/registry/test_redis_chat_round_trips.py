"""A chat's own round trips to Redis, pinned so that they cannot creep back: SendMessage
subscribes to the session's events (only when no stream of this process follows the session and
no recent one did) and starts the job, reading the session in the same script (one pipelined
round trip; the session read was a round trip of its own before) before the caller sees
`accepted`; once the final event is sent the stream ends without another round trip (the
subscription lingers for the session's next chat and is dropped later, with others, in one
command). The job's notices, sent together by its service (a burst on its ReportUpdates
stream), are applied together: one round trip for all of them (they cost one each before), and
the first of them confirms the hand-off, so it costs no round trip of its own (0.75 per chat
before, coalesced), its entry in the hand-off set removed by the next pipeline."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from domain.chat import ChatMessage, ChatOrchestrator
from domain.dispatch import CallContext
from domain.jobs import EventDraft, EventKind, JobLimits, NoticeEvent, NoticeOutcome, SessionEvent
from domain.models import Service, TokenUsage
from domain.notices import NoticeInput, NoticeProcessor
from domain.sessions import SessionManager, SessionPolicy
from registry.backend import Backend, RedisInstance
from registry.keys import KeySpace
from registry.lua_scripts import lua_script
from registry.redis_client import PooledConnection
from tests.support.downstream import RecordingDispatcher
from tests.support.platform import FakeConversation
from tests.support.registries import count_round_trips, new_session, opened_registry

TENANT = "acme"
LIMITS = JobLimits(deadline_ms=60_000, heartbeat_ms=30_000, retention_ms=60_000)
COMPLETED = {
    "result": {"text": "hello", "model": "m1"},
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


@pytest.fixture
async def registry(redis_url: str) -> AsyncIterator[Backend]:
    async with opened_registry(redis_url) as opened:
        yield opened


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    return count_round_trips(monkeypatch)


@pytest.fixture
def dispatcher() -> RecordingDispatcher:
    return RecordingDispatcher()


@pytest.fixture
async def chat(
    registry: Backend, dispatcher: RecordingDispatcher
) -> AsyncIterator[ChatOrchestrator]:
    sessions = SessionManager(
        registry.sessions,
        SessionPolicy(default_ttl_ms=60_000, max_ttl_ms=120_000),
        conversation=FakeConversation(),
    )
    orchestrator = ChatOrchestrator(sessions, registry.jobs, registry.events, dispatcher, LIMITS)
    # Warm up: connections made and scripts loaded (their first use costs round trips of its
    # own), on a session of its own.
    warm_up = await new_session(registry)
    ctx = CallContext(tenant_id=TENANT, request_id="r0")
    async for event in orchestrator.send(ctx, ChatMessage(session_id=warm_up, content="hi")):
        if event.kind is not EventKind.ACCEPTED:
            continue
        await dispatcher.next_submit()
        draft = EventDraft(event.job_id, EventKind.COMPLETED, "r0", COMPLETED)
        await registry.jobs.finish_job(TENANT, event.job_id, draft, LIMITS)
    yield orchestrator
    await orchestrator.drain(5.0)


async def chat_round_trips(
    chat: ChatOrchestrator,
    registry: Backend,
    dispatcher: RecordingDispatcher,
    round_trips: list[int],
    session_id: str,
) -> tuple[int, int]:
    """One chat on ``session_id``: (round trips until `accepted` reached the caller, round
    trips from the final event reaching the caller to the end of its stream)."""
    ctx = CallContext(tenant_id=TENANT, request_id="r1")
    stream = aiter(chat.send(ctx, ChatMessage(session_id=session_id, content="hi")))
    before = len(round_trips)
    accepted: SessionEvent = await anext(stream)
    to_accepted = len(round_trips) - before
    assert accepted.kind is EventKind.ACCEPTED
    await dispatcher.next_submit()
    draft = EventDraft(accepted.job_id, EventKind.COMPLETED, "r1", COMPLETED)
    await registry.jobs.finish_job(TENANT, accepted.job_id, draft, LIMITS)
    final: Any = await anext(stream)
    assert final.kind is EventKind.COMPLETED
    before = len(round_trips)
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    return to_accepted, len(round_trips) - before


async def test_a_sessions_first_chat_costs_two_round_trips_before_it_is_accepted(
    chat: ChatOrchestrator,
    registry: Backend,
    dispatcher: RecordingDispatcher,
    round_trips: list[int],
) -> None:
    session_id = await new_session(registry)
    # SUBSCRIBE, and the job's start with the session read and its hints (one pipeline).
    assert (await chat_round_trips(chat, registry, dispatcher, round_trips, session_id))[0] == 2


async def test_a_sessions_next_chat_reuses_its_subscription_and_costs_one_round_trip(
    chat: ChatOrchestrator,
    registry: Backend,
    dispatcher: RecordingDispatcher,
    round_trips: list[int],
) -> None:
    session_id = await new_session(registry)
    await chat_round_trips(chat, registry, dispatcher, round_trips, session_id)
    # The job's start with the session read: the first chat's subscription still serves.
    assert (await chat_round_trips(chat, registry, dispatcher, round_trips, session_id))[0] == 1


async def test_a_chats_stream_ends_after_its_final_event_without_a_round_trip(
    chat: ChatOrchestrator,
    registry: Backend,
    dispatcher: RecordingDispatcher,
    round_trips: list[int],
) -> None:
    session_id = await new_session(registry)
    assert (await chat_round_trips(chat, registry, dispatcher, round_trips, session_id))[1] == 0


def reference_notices(job_id: str) -> list[NoticeInput]:
    """What the reference Query service sends for a chat (2 deltas), numbered."""
    events: list[tuple[NoticeEvent, dict[str, Any]]] = [
        (NoticeEvent.PROGRESS, {"fraction": 0.1, "message": "retrieving"}),
        (NoticeEvent.DELTA, {"text": "hel"}),
        (NoticeEvent.DELTA, {"text": "lo"}),
        (NoticeEvent.PROGRESS, {"fraction": 0.9, "message": "finishing"}),
        (NoticeEvent.COMPLETED, {"result": {"text": "hello", "model": "m1"}}),
    ]
    return [
        NoticeInput(
            event,
            Service.QUERY,
            job_id,
            TENANT,
            n,
            "agent-1",
            data,
            TokenUsage(1, 1, 2) if event is NoticeEvent.COMPLETED else TokenUsage(),
        )
        for n, (event, data) in enumerate(events, 1)
    ]


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """What each round trip of any Redis client of this process writes."""
    written: list[bytes] = []
    original = PooledConnection.send_packed_command

    async def recording(self: PooledConnection, command: Any, check_health: bool = True) -> None:
        parts = command if isinstance(command, list) else [command]
        written.append(b"".join(bytes(part) for part in parts))
        await original(self, command, check_health)

    monkeypatch.setattr(PooledConnection, "send_packed_command", recording)
    return written


async def handoff_entries(registry: Backend) -> list[str]:
    """The members of the hand-off set (every shard)."""
    assert isinstance(registry.instance, RedisInstance)
    redis = registry.instance.redis
    members: list[str] = []
    for key in KeySpace("test").hint_keys("job-handoffs"):
        members += [str(m) for m in await redis.zrange(key, 0, -1)]
    return members


async def test_a_chat_whose_notices_arrive_together_costs_two_round_trips_in_all(
    chat: ChatOrchestrator,
    registry: Backend,
    dispatcher: RecordingDispatcher,
    sent: list[bytes],
) -> None:
    """The job's start (with the session read), then the five notices of its service in one
    round trip (seven before: one per notice). The first notice confirmed the hand-off: none is
    written for it, not even when the orchestrator stops (it writes the rest then)."""
    processor = NoticeProcessor(registry.jobs, LIMITS, on_handed_over=chat.notice_applied)
    session_id = await new_session(registry)
    notice_sha = lua_script("jobs/notice").sha.encode()
    await chat.drain(5.0)  # the warm-up's confirmation (its job was finished without notices)
    for attempt in (1, 2):  # the first chat loads the notice script and subscribes
        ctx = CallContext(tenant_id=TENANT, request_id=f"r{attempt}")
        stream = aiter(chat.send(ctx, ChatMessage(session_id=session_id, content="hi")))
        sent.clear()
        accepted: SessionEvent = await anext(stream)
        await dispatcher.next_submit()
        outcomes = await processor.process_each(reference_notices(accepted.job_id), None)
        assert all(isinstance(o, NoticeOutcome) and o.event is not None for o in outcomes)
        kinds = [event.kind async for event in stream]
        assert kinds[-1] is EventKind.COMPLETED
    await chat.drain(5.0)
    notices = [written for written in sent if notice_sha in written]
    assert len(notices) == 1 and notices[0].count(b"EVALSHA") == 5
    assert len(sent) == 2


async def test_a_hand_off_its_first_notice_confirmed_leaves_the_hand_off_set_in_the_next_pipeline(
    chat: ChatOrchestrator,
    registry: Backend,
    dispatcher: RecordingDispatcher,
    round_trips: list[int],
) -> None:
    processor = NoticeProcessor(registry.jobs, LIMITS, on_handed_over=chat.notice_applied)
    session_id = await new_session(registry)
    ctx = CallContext(tenant_id=TENANT, request_id="r1")
    stream = aiter(chat.send(ctx, ChatMessage(session_id=session_id, content="hi")))
    accepted: SessionEvent = await anext(stream)
    await dispatcher.next_submit()
    await processor.process_each(reference_notices(accepted.job_id), None)
    assert [event.kind async for event in stream][-1] is EventKind.COMPLETED
    member = f"{TENANT} {session_id} {accepted.job_id}"
    assert member in await handoff_entries(registry)  # no round trip was spent on it

    # The next chat's start takes it along (no round trip more).
    assert (await chat_round_trips(chat, registry, dispatcher, round_trips, session_id))[0] == 1
    assert member not in await handoff_entries(registry)

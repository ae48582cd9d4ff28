"""The SDK's sessions and chat against a real server and the reference services, both
backends."""

from __future__ import annotations

import asyncio

import pytest

from aorkestra import AsyncClient, Client, events
from aorkestra._proto.orchestrator.v1 import session_pb2
from aorkestra.errors import InvalidArgument, NotFound
from domain.identity import Role
from tests.sdk.conftest import Platform, start_platform
from tests.support.keys import api_key_for


async def test_a_session_is_created_read_listed_and_closed(client: AsyncClient) -> None:
    created = await client.sessions.create("support-bot", metadata={"k": "v"}, ttl=600)
    assert (await client.sessions.get(created.session_id)).agent_id == "support-bot"
    listed = await client.sessions.list(state="active")
    assert created.session_id in {s.session_id for s in listed.sessions}
    closed = await client.sessions.close(created.session_id)
    assert closed.state == session_pb2.SESSION_STATE_CLOSED


async def test_send_yields_typed_events_in_order_up_to_completed(client: AsyncClient) -> None:
    session = await client.sessions.create("support-bot")
    seen = [event async for event in client.chat.send(session.session_id, "What is an agent?")]
    assert isinstance(seen[0], events.Accepted)
    assert isinstance(seen[-1], events.Completed)
    assert any(isinstance(e, events.Delta) for e in seen)
    sequences = [e.sequence for e in seen]
    assert sequences == sorted(set(sequences))
    assert {e.job_id for e in seen} == {seen[0].job_id}
    assert seen[-1].usage.total_tokens > 0


async def test_reply_returns_the_final_text(client: AsyncClient) -> None:
    session = await client.sessions.create("support-bot")
    text = await client.chat.reply(session.session_id, "What is an agent?")
    assert text.strip()


async def test_follow_yields_every_event_after_the_cursor_exactly_once(
    client: AsyncClient,
) -> None:
    session = await client.sessions.create("support-bot")
    sent = [e async for e in client.chat.send(session.session_id, "one")]
    after = sent[1].sequence
    followed: list[events.Event] = []
    async for event in client.sessions.follow(session.session_id, after=after):
        followed.append(event)
        if event.sequence == sent[-1].sequence:
            break
    assert [e.sequence for e in followed] == [e.sequence for e in sent[2:]]


async def test_a_wrong_request_raises_the_typed_error_with_field_and_request_id(
    client: AsyncClient,
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await client.sessions.create("")
    assert caught.value.request_id
    assert "agent_id" in {v.field for v in caught.value.details.field_violations}


async def test_another_tenants_session_is_not_found(
    platform: Platform, client: AsyncClient
) -> None:
    session = await client.sessions.create("support-bot")
    async with platform.client("other-tenant") as other:
        with pytest.raises(NotFound) as caught:
            await other.sessions.get(session.session_id)
    assert caught.value.request_id


async def test_cancel_ends_a_job_with_a_cancelled_event(backend_url: str | None) -> None:
    async with start_platform(backend_url, step_delay_s=0.5) as slow:
        async with slow.client() as sdk:
            session = await sdk.sessions.create("support-bot")
            stream = sdk.chat.send(session.session_id, "take your time")
            accepted = await anext(stream)
            await sdk.chat.cancel(session.session_id, accepted.job_id)
            rest = [e async for e in stream]
        assert isinstance(rest[-1], events.Cancelled)


async def test_the_sync_client_sends_and_follows(platform: Platform) -> None:
    def run() -> tuple[list[str], str]:
        with Client(platform.address, api_key=api_key_for("acme", Role.CLIENT)) as sdk:
            session = sdk.sessions.create("support-bot")
            kinds = [e.kind for e in sdk.chat.send(session.session_id, "hi")]
            return kinds, sdk.health()

    kinds, health = await asyncio.to_thread(run)
    assert kinds[0] == "accepted"
    assert kinds[-1] == "completed"
    assert health == "SERVING"


async def test_the_sync_client_refuses_calls_after_close_and_drops_open_iterators(
    platform: Platform,
) -> None:
    def run() -> None:
        sdk = Client(platform.address, api_key=api_key_for("acme", Role.CLIENT))
        session = sdk.sessions.create("support-bot")
        stream = sdk.chat.send(session.session_id, "hi")
        assert next(stream).kind == "accepted"
        sdk.close()
        stream.close()  # returns instead of waiting on the stopped loop
        with pytest.raises(RuntimeError, match="closed"):
            sdk.sessions.get(session.session_id)

    await asyncio.wait_for(asyncio.to_thread(run), 30)

"""The SessionStore contract: every backend must pass every test here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from domain.ids import new_id
from domain.models import NewSession, SessionFilter, SessionState
from domain.ports.sessions import SessionStore
from registry.backend import BackendConfig, open_backend

RETENTION_MS = 400


@pytest.fixture
async def store(backend_url: str | None) -> AsyncIterator[SessionStore]:
    registry = open_backend(
        BackendConfig(redis_url=backend_url, key_prefix="test", session_retention_ms=RETENTION_MS)
    )
    yield registry.sessions
    await registry.aclose()


def new_session(agent: str = "agent-1", ttl_ms: int = 60_000) -> NewSession:
    return NewSession(agent_id=agent, user_id="user-1", metadata={"k": "v"}, ttl_ms=ttl_ms)


async def wait_for_state(
    store: SessionStore, tenant: str, session_id: str, wanted: SessionState | None
) -> None:
    """Poll (without sliding the TTL) until the session reads as ``wanted`` (None: gone)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        session = await store.get_session(tenant, session_id, touch=False)
        if (session.state if session else None) == wanted:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"session never reached {wanted}")


async def test_created_session_reads_back_with_every_field(store: SessionStore) -> None:
    sid = new_id()
    created = await store.create_session("t1", sid, new_session())
    read = await store.get_session("t1", sid, touch=False)
    assert read == created
    assert read.state is SessionState.ACTIVE
    assert read.metadata == {"k": "v"}
    assert read.expires_at_ms == read.created_at_ms + 60_000
    assert read.pending_job_ids == ()
    assert read.message_count == 0


async def test_missing_session_reads_as_none(store: SessionStore) -> None:
    assert await store.get_session("t1", new_id(), touch=False) is None


async def test_other_tenants_session_is_invisible(store: SessionStore) -> None:
    sid = new_id()
    await store.create_session("t1", sid, new_session())
    assert await store.get_session("t2", sid, touch=True) is None
    assert await store.close_session("t2", sid) is None
    page = await store.list_sessions("t2", limit=10, after=None, filter=SessionFilter())
    assert page.items == []
    still = await store.get_session("t1", sid, touch=False)
    assert still is not None and still.state is SessionState.ACTIVE


async def test_touch_slides_expiry(store: SessionStore) -> None:
    sid = new_id()
    created = await store.create_session("t1", sid, new_session())
    await asyncio.sleep(0.01)
    touched = await store.get_session("t1", sid, touch=True)
    assert touched is not None
    assert touched.expires_at_ms > created.expires_at_ms


async def test_session_past_ttl_reads_expired_then_vanishes(store: SessionStore) -> None:
    sid = new_id()
    await store.create_session("t1", sid, new_session(ttl_ms=150))
    await wait_for_state(store, "t1", sid, SessionState.EXPIRED)
    expired = await store.get_session("t1", sid, touch=True)
    assert expired is not None and expired.state is SessionState.EXPIRED
    await wait_for_state(store, "t1", sid, None)


async def test_close_marks_closed_and_is_idempotent(store: SessionStore) -> None:
    sid = new_id()
    await store.create_session("t1", sid, new_session())
    closed = await store.close_session("t1", sid)
    assert closed is not None and closed.state is SessionState.CLOSED
    again = await store.close_session("t1", sid)
    assert again is not None and again.state is SessionState.CLOSED
    assert again.updated_at_ms == closed.updated_at_ms


async def test_closed_session_vanishes_after_retention(store: SessionStore) -> None:
    sid = new_id()
    await store.create_session("t1", sid, new_session())
    await store.close_session("t1", sid)
    await wait_for_state(store, "t1", sid, None)


async def test_closing_an_expired_session_leaves_it_expired(store: SessionStore) -> None:
    sid = new_id()
    await store.create_session("t1", sid, new_session(ttl_ms=100))
    await asyncio.sleep(0.15)
    result = await store.close_session("t1", sid)
    assert result is not None and result.state is SessionState.EXPIRED


async def test_open_session_creates_a_missing_one(store: SessionStore) -> None:
    sid = new_id()
    opened = await store.open_session("t1", sid, new_session())
    assert opened.state is SessionState.ACTIVE and opened.agent_id == "agent-1"
    assert await store.get_session("t1", sid, touch=False) == opened


async def test_open_session_keeps_an_open_one_as_it_is(store: SessionStore) -> None:
    sid = new_id()
    created = await store.create_session("t1", sid, new_session("agent-1"))
    opened = await store.open_session("t1", sid, new_session("agent-2"))
    assert opened == created


async def test_open_session_replaces_a_closed_one(store: SessionStore) -> None:
    sid = new_id()
    await store.create_session("t1", sid, new_session("agent-1"))
    await store.close_session("t1", sid)
    opened = await store.open_session("t1", sid, new_session("agent-2"))
    assert opened.state is SessionState.ACTIVE and opened.agent_id == "agent-2"
    assert await store.get_session("t1", sid, touch=False) == opened


async def test_open_session_replaces_one_past_its_expiry(store: SessionStore) -> None:
    sid = new_id()
    await store.create_session("t1", sid, new_session("agent-1", ttl_ms=100))
    await asyncio.sleep(0.15)
    opened = await store.open_session("t1", sid, new_session("agent-2"))
    assert opened.state is SessionState.ACTIVE and opened.agent_id == "agent-2"


async def test_racing_opens_of_one_id_all_get_the_same_session(store: SessionStore) -> None:
    sid = new_id()
    opened = await asyncio.gather(
        *(store.open_session("t1", sid, new_session(f"agent-{n}")) for n in range(8))
    )
    assert len({session.agent_id for session in opened}) == 1
    read = await store.get_session("t1", sid, touch=False)
    assert read is not None and read.agent_id == opened[0].agent_id


async def test_open_session_is_scoped_to_its_tenant(store: SessionStore) -> None:
    sid = new_id()
    await store.create_session("t1", sid, new_session("agent-1"))
    theirs = await store.open_session("t2", sid, new_session("agent-2"))
    assert theirs.tenant_id == "t2" and theirs.agent_id == "agent-2"
    mine = await store.get_session("t1", sid, touch=False)
    assert mine is not None and mine.agent_id == "agent-1"


async def test_list_pages_newest_first_without_gaps_or_repeats(store: SessionStore) -> None:
    ids = []
    for _ in range(7):
        sid = new_id()
        ids.append(sid)
        await store.create_session("t1", sid, new_session())
        await asyncio.sleep(0.002)  # distinct milliseconds, so the id order is the creation order
    seen: list[str] = []
    after = None
    while True:
        page = await store.list_sessions("t1", limit=3, after=after, filter=SessionFilter())
        assert len(page.items) <= 3
        seen.extend(s.session_id for s in page.items)
        if page.next_cursor is None:
            break
        after = page.next_cursor
    assert seen == list(reversed(ids))


async def test_list_filters_by_state_and_agent(store: SessionStore) -> None:
    a1, a2, a3 = new_id(), new_id(), new_id()
    await store.create_session("t1", a1, new_session(agent="alpha"))
    await store.create_session("t1", a2, new_session(agent="beta"))
    await store.create_session("t1", a3, new_session(agent="alpha"))
    await store.close_session("t1", a3)
    by_agent = await store.list_sessions(
        "t1", limit=10, after=None, filter=SessionFilter(agent_id="alpha")
    )
    assert {s.session_id for s in by_agent.items} == {a1, a3}
    closed_alpha = await store.list_sessions(
        "t1",
        limit=10,
        after=None,
        filter=SessionFilter(state=SessionState.CLOSED, agent_id="alpha"),
    )
    assert [s.session_id for s in closed_alpha.items] == [a3]
    assert closed_alpha.next_cursor is None


async def test_list_reports_expired_sessions_as_expired(store: SessionStore) -> None:
    sid = new_id()
    await store.create_session("t1", sid, new_session(ttl_ms=100))
    await asyncio.sleep(0.15)
    page = await store.list_sessions(
        "t1", limit=10, after=None, filter=SessionFilter(state=SessionState.EXPIRED)
    )
    assert [s.session_id for s in page.items] == [sid]

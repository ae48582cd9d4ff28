"""CreateSession's agent check, AdminService.InvalidateAgent and SessionService.ListHistory over
a real server (both backends) whose Agent Management and Conversation are real grpc.aio
servers (tests.support.platform_services) reached by the server's own clients."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from orchestrator.admin.v1 import admin_pb2, admin_pb2_grpc
from orchestrator.v1 import session_pb2, session_pb2_grpc
from tests.rpc.test_metrics_endpoint import samples, scrape
from tests.rpc.test_session_service import field_violations
from tests.support.platform_services import (
    FakeAgentManagement,
    FakeConversation,
    platform_settings,
    serving,
)
from tests.support.servers import RunningServer, admin, running_server, tenant, test_settings

NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass
class Platform:
    server: RunningServer
    agents: FakeAgentManagement
    conversation: FakeConversation

    @property
    def sessions(self) -> session_pb2_grpc.SessionServiceAsyncStub:
        return session_pb2_grpc.SessionServiceStub(self.server.channel)

    @property
    def admin(self) -> admin_pb2_grpc.AdminServiceAsyncStub:
        return admin_pb2_grpc.AdminServiceStub(self.server.channel)

    async def create(self, agent_id: str = "support-bot", tenant_id: str = "acme") -> str:
        reply = await self.sessions.CreateSession(
            session_pb2.CreateSessionRequest(agent_id=agent_id), metadata=tenant(tenant_id)
        )
        return str(reply.session.session_id)

    async def history(
        self, session_id: str, tenant_id: str = "acme", **fields: int | str
    ) -> session_pb2.ListHistoryResponse:
        request = session_pb2.ListHistoryRequest(session_id=session_id, **fields)  # type: ignore[arg-type]
        reply: session_pb2.ListHistoryResponse = await self.sessions.ListHistory(
            request, metadata=tenant(tenant_id)
        )
        return reply


@pytest.fixture
async def platform(backend_url: str | None) -> AsyncIterator[Platform]:
    agents, conversation = FakeAgentManagement(), FakeConversation()
    agents.set_agent("acme", "support-bot", version=1)
    async with (
        serving(agents, conversation) as address,
        running_server(test_settings(backend_url, **platform_settings(address))) as server,
    ):
        yield Platform(server, agents, conversation)


async def test_a_session_needs_an_agent_of_the_callers_tenant(platform: Platform) -> None:
    assert await platform.create("support-bot")
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await platform.create("no-such-bot")
    assert missing.value.code() == NOT_FOUND
    assert "no-such-bot" in (missing.value.details() or "")
    # Another tenant's agent of the same id does not exist for this one.
    with pytest.raises(grpc.aio.AioRpcError) as foreign:
        await platform.create("support-bot", tenant_id="globex")
    assert foreign.value.code() == NOT_FOUND
    assert [(r.tenant_id, r.agent_id) for r in platform.agents.requests] == [
        ("acme", "support-bot"),
        ("acme", "no-such-bot"),
        ("globex", "support-bot"),
    ]


async def test_agent_management_down_is_unavailable_unless_the_agent_is_cached(
    platform: Platform,
) -> None:
    platform.agents.set_agent("acme", "other-bot", version=1)
    await platform.create("support-bot")  # cached now
    platform.agents.down = True
    assert await platform.create("support-bot")
    with pytest.raises(grpc.aio.AioRpcError) as down:
        await platform.create("other-bot")
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "agent_management" in (down.value.details() or "")


async def test_lookups_are_counted_as_hits_and_misses_in_metrics(platform: Platform) -> None:
    for _ in range(3):
        await platform.create("support-bot")
    found = samples(await scrape(platform.server))
    assert found[("orchestrator_agent_cache_lookups_total", ("outcome", "miss"))] == 1
    assert found[("orchestrator_agent_cache_lookups_total", ("outcome", "hit"))] == 2
    assert len(platform.agents.requests) == 1


async def test_invalidate_agent_makes_the_next_lookup_ask_agent_management(
    platform: Platform,
) -> None:
    await platform.create("support-bot")
    await platform.admin.InvalidateAgent(
        admin_pb2.InvalidateAgentRequest(tenant_id="acme", agent_id="support-bot"),
        metadata=admin(),
    )
    platform.agents.set_agent("acme", "support-bot", version=2)
    await platform.create("support-bot")
    assert len(platform.agents.requests) == 2
    cached, _ = await platform.server.server.backend.agent_cache.lookup("acme", "support-bot")
    assert cached is not None and cached.version == 2


async def test_invalidate_agent_needs_the_admin_role(platform: Platform) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await platform.admin.InvalidateAgent(
            admin_pb2.InvalidateAgentRequest(tenant_id="acme", agent_id="support-bot"),
            metadata=tenant("acme"),
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("tenant_id", "agent_id", "field"),
    [
        ("", "support-bot", "tenant_id"),
        ("a{b}", "support-bot", "tenant_id"),
        ("t" * 1025, "support-bot", "tenant_id"),
        ("acme", "", "agent_id"),
        ("acme", "a" * 129, "agent_id"),
        ("acme", "a" * 1025, "agent_id"),
    ],
)
async def test_invalidate_agent_names_a_bad_field(
    platform: Platform, tenant_id: str, agent_id: str, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await platform.admin.InvalidateAgent(
            admin_pb2.InvalidateAgentRequest(tenant_id=tenant_id, agent_id=agent_id),
            metadata=admin(),
        )
    assert bad.value.code() == INVALID
    assert list(field_violations(bad.value)) == [field]


async def test_history_pages_through_the_window_oldest_first(platform: Platform) -> None:
    session_id = await platform.create()
    platform.conversation.add_turns("acme", session_id, 7)
    first = await platform.history(session_id, page_size=2, last_turns=5)
    assert [t.content for t in first.turns] == ["turn 2", "turn 3"]
    assert first.turns[0].role == session_pb2.TURN_ROLE_USER
    assert first.turns[1].role == session_pb2.TURN_ROLE_ASSISTANT
    assert first.turns[0].job_id == "job-1" and first.turns[0].tokens == 10
    assert first.turns[0].time.ToMilliseconds() == 1_700_000_000_002
    contents = [t.content for t in first.turns]
    token = first.next_page_token
    while token:
        page = await platform.history(session_id, page_size=2, last_turns=5, page_token=token)
        contents += [t.content for t in page.turns]
        token = page.next_page_token
    assert contents == [f"turn {n}" for n in range(2, 7)]
    budget = await platform.history(session_id, token_budget=25)
    assert [t.content for t in budget.turns] == ["turn 5", "turn 6"]
    everything = await platform.history(session_id)
    assert len(everything.turns) == 7 and not everything.next_page_token
    request = platform.conversation.requests[-1]
    assert (request.tenant_id, request.session_id, request.page_size) == ("acme", session_id, 50)


async def test_history_of_another_tenants_session_is_not_found(platform: Platform) -> None:
    session_id = await platform.create()
    platform.conversation.add_turns("acme", session_id, 2)
    with pytest.raises(grpc.aio.AioRpcError) as foreign:
        await platform.history(session_id, tenant_id="globex")
    assert foreign.value.code() == NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await platform.history("0190b2a4-6f0e-7c6e-8a8e-2f5b1c3d4e5f")
    assert unknown.value.code() == NOT_FOUND
    assert platform.conversation.requests == []  # Conversation was never asked


async def test_a_page_token_only_continues_its_own_session_and_window(
    platform: Platform,
) -> None:
    first, second = await platform.create(), await platform.create()
    platform.conversation.add_turns("acme", first, 4)
    page = await platform.history(first, page_size=1)
    for session_id, last_turns in ((second, 0), (first, 2)):
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await platform.history(
                session_id, page_size=1, page_token=page.next_page_token, last_turns=last_turns
            )
        assert bad.value.code() == INVALID
        assert list(field_violations(bad.value)) == ["page_token"]


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"session_id": ""}, ["session_id"]),
        ({"session_id": "not-an-id"}, ["session_id"]),
        (
            {"page_size": -1, "last_turns": -1, "token_budget": -1},
            ["last_turns", "token_budget", "page_size"],
        ),
        ({"last_turns": 10_001}, ["last_turns"]),
        ({"token_budget": 1_000_000_001}, ["token_budget"]),
        ({"page_token": "garbage"}, ["page_token"]),
        ({"page_token": "x" * 4097}, ["page_token"]),
    ],
)
async def test_history_names_every_bad_field(
    platform: Platform, fields: dict[str, int | str], bad: list[str]
) -> None:
    session_id = await platform.create()
    request = {"session_id": session_id, **fields}
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await platform.sessions.ListHistory(
            session_pb2.ListHistoryRequest(**request),  # type: ignore[arg-type]
            metadata=tenant("acme"),
        )
    assert refused.value.code() == INVALID
    assert sorted(field_violations(refused.value)) == sorted(bad)


async def test_conversation_down_is_unavailable_naming_it(platform: Platform) -> None:
    session_id = await platform.create()
    platform.conversation.down = True
    with pytest.raises(grpc.aio.AioRpcError) as down:
        await platform.history(session_id)
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "conversation" in (down.value.details() or "")

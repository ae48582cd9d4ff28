"""Two orchestrator replicas on one real redis-server share the agent cache: a configuration one
fetched is served by the other, and once an invalidation (AdminService.InvalidateAgent, or an
agent_changed notice from Agent Management) returns on one replica, the next lookup on the other
gets the agent's new version from Agent Management (a real grpc.aio server in the test, whose
answer the test changes)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from domain.dispatch import CallContext
from orchestrator.admin.v1 import admin_pb2, admin_pb2_grpc
from orchestrator.v1 import (
    common_pb2,
    session_pb2,
    session_pb2_grpc,
    task_update_pb2,
    task_update_pb2_grpc,
)
from tests.support.platform_services import FakeAgentManagement, platform_settings, serving
from tests.support.servers import (
    RunningServer,
    admin,
    running_server,
    service,
    tenant,
    test_settings,
)

ACME = CallContext(tenant_id="acme", request_id="lookup")


async def version_on(replica: RunningServer) -> int:
    """The version of acme's support-bot a lookup on ``replica`` gets (what the next message
    or session on it would use)."""
    agent = await replica.server.services.agents_directory.get_agent("support-bot", ACME)
    assert agent is not None
    return agent.version


@pytest.fixture
async def agents() -> FakeAgentManagement:
    agents = FakeAgentManagement()
    agents.set_agent("acme", "support-bot", version=1)
    return agents


@pytest.fixture
async def replicas(
    redis_url: str, agents: FakeAgentManagement
) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    async with serving(agents) as address:
        settings = test_settings(redis_url, **platform_settings(address))
        async with running_server(settings) as a, running_server(settings) as b:
            yield a, b


async def test_an_invalidation_on_one_replica_reaches_the_next_lookup_on_the_other(
    replicas: tuple[RunningServer, RunningServer], agents: FakeAgentManagement
) -> None:
    a, b = replicas
    # B creates a session: its lookup misses and caches version 1 for every replica.
    await session_pb2_grpc.SessionServiceStub(b.channel).CreateSession(
        session_pb2.CreateSessionRequest(agent_id="support-bot"), metadata=tenant("acme")
    )
    assert await version_on(a) == 1
    assert len(agents.requests) == 1  # A was served from the shared cache

    # Agent Management changes the agent; until it is invalidated the cache keeps version 1.
    agents.set_agent("acme", "support-bot", version=2)
    assert await version_on(b) == 1

    await admin_pb2_grpc.AdminServiceStub(a.channel).InvalidateAgent(
        admin_pb2.InvalidateAgentRequest(tenant_id="acme", agent_id="support-bot"),
        metadata=admin(),
    )
    assert await version_on(b) == 2
    assert await version_on(a) == 2
    assert len(agents.requests) == 2  # one replica fetched version 2, the other shared it


async def test_an_invalidation_of_one_tenants_agent_leaves_anothers_cached(
    replicas: tuple[RunningServer, RunningServer], agents: FakeAgentManagement
) -> None:
    a, b = replicas
    agents.set_agent("globex", "support-bot", version=5)
    globex = CallContext(tenant_id="globex", request_id="lookup")
    directory_b = b.server.services.agents_directory
    assert (await directory_b.get_agent("support-bot", globex)) is not None
    assert await version_on(b) == 1
    agents.set_agent("globex", "support-bot", version=6)
    agents.set_agent("acme", "support-bot", version=2)
    await admin_pb2_grpc.AdminServiceStub(a.channel).InvalidateAgent(
        admin_pb2.InvalidateAgentRequest(tenant_id="acme", agent_id="support-bot"),
        metadata=admin(),
    )
    assert await version_on(b) == 2
    still = await directory_b.get_agent("support-bot", globex)
    assert still is not None and still.version == 5


async def test_an_agent_changed_notice_on_one_replica_reaches_the_next_lookup_on_the_other(
    replicas: tuple[RunningServer, RunningServer], agents: FakeAgentManagement
) -> None:
    a, b = replicas
    assert await version_on(b) == 1
    agents.set_agent("acme", "support-bot", version=2)
    changed = task_update_pb2.PublishUpdatesRequest(
        event=task_update_pb2.NOTICE_EVENT_AGENT_CHANGED,
        service=common_pb2.SERVICE_AGENT_MANAGEMENT,
        tenant_id="acme",
        agent_id="support-bot",
    )
    reply = await task_update_pb2_grpc.TaskUpdateServiceStub(a.channel).PublishUpdates(
        iter([changed]), metadata=service(), timeout=10
    )
    assert reply.accepted == 1
    assert await version_on(b) == 2

"""Agent Management and Conversation for tests: real grpc.aio servers on loopback whose answers
a test sets (change an agent, add turns, take the service down), reached by the server's real
clients (clients.platform) through ``platform_settings``."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from agents.v1 import agents_pb2, agents_pb2_grpc
from conversation.v1 import conversation_pb2, conversation_pb2_grpc
from reference.conversation import ConversationLog, ConversationServicer

Ctx = grpc.aio.ServicerContext[Any, Any]


class FakeAgentManagement(agents_pb2_grpc.AgentManagementServiceServicer):
    """Agents by (tenant, agent id); every GetAgent is recorded. ``down`` answers UNAVAILABLE."""

    def __init__(self) -> None:
        self.agents: dict[tuple[str, str], agents_pb2.Agent] = {}
        self.requests: list[agents_pb2.GetAgentRequest] = []
        self.down = False

    def set_agent(self, tenant_id: str, agent_id: str, *, version: int, model: str = "m") -> None:
        """Create or change an llm agent (Agent Management's own change, not yet announced)."""
        self.agents[(tenant_id, agent_id)] = agents_pb2.Agent(
            tenant_id=tenant_id,
            agent_id=agent_id,
            kind=agents_pb2.AGENT_KIND_LLM,
            model=model,
            system_prompt=f"{agent_id} v{version}",
            version=version,
        )

    async def GetAgent(
        self, request: agents_pb2.GetAgentRequest, context: Ctx
    ) -> agents_pb2.GetAgentResponse:
        self.requests.append(request)
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "agent management is down")
        agent = self.agents.get((request.tenant_id, request.agent_id))
        if agent is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no agent {request.agent_id}")
        return agents_pb2.GetAgentResponse(agent=agent)


class FakeConversation(ConversationServicer):
    """The reference Conversation service (windows from the newest turn, pinned pages) over a
    log the test fills. Every ListHistory is recorded; ``down`` answers UNAVAILABLE."""

    def __init__(self) -> None:
        super().__init__(ConversationLog())
        self.requests: list[conversation_pb2.ListHistoryRequest] = []
        self.down = False
        self._added: Counter[tuple[str, str]] = Counter()

    def add_turns(self, tenant_id: str, session_id: str, count: int, tokens: int = 10) -> None:
        """``count`` turns, user and assistant in turn, numbered in their content."""
        for _ in range(count):
            n = self._added[(tenant_id, session_id)]
            self._added[(tenant_id, session_id)] += 1
            role = conversation_pb2.ROLE_USER if n % 2 == 0 else conversation_pb2.ROLE_ASSISTANT
            time = timestamp_pb2.Timestamp()
            time.FromMilliseconds(1_700_000_000_000 + n)
            turn = conversation_pb2.Turn(
                role=role, content=f"turn {n}", job_id=f"job-{n // 2}", time=time, tokens=tokens
            )
            # Appends are once per job id: each turn is its own append.
            self.log.append(tenant_id, session_id, f"add-{n}", [turn])

    async def ListHistory(
        self, request: conversation_pb2.ListHistoryRequest, context: Ctx
    ) -> conversation_pb2.ListHistoryResponse:
        self.requests.append(request)
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "conversation is down")
        return await super().ListHistory(request, context)


@asynccontextmanager
async def serving(
    agents: FakeAgentManagement | None = None, conversation: FakeConversation | None = None
) -> AsyncIterator[str]:
    """A grpc.aio server with the given fakes on a free loopback port; yields its address."""
    server = grpc.aio.server()
    if agents is not None:
        agents_pb2_grpc.add_AgentManagementServiceServicer_to_server(agents, server)
    if conversation is not None:
        conversation_pb2_grpc.add_ConversationServiceServicer_to_server(conversation, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


def platform_settings(address: str) -> dict[str, Any]:
    """test_settings overrides: Agent Management and Conversation at ``address``, the agent
    check on, one attempt per call (a service that is down fails the call at once)."""
    return {
        "agent_check": True,
        "agent_management_address": address,
        "conversation_address": address,
        "downstream_attempts": 1,
    }

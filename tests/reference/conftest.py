"""Fixtures: a recording stand-in orchestrator and the reference services reporting to it."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest

from agent_execution.v1 import agent_execution_pb2_grpc
from agents.v1 import agents_pb2_grpc
from conversation.v1 import conversation_pb2_grpc
from embedding.v1 import embedding_pb2_grpc
from query.v1 import query_pb2_grpc
from reference.app import ReferenceServices
from reference.config import ReferenceConfig
from tests.support.task_updates import RecordingOrchestrator
from tools.v1 import tools_pb2_grpc
from workflow.v1 import workflow_pb2_grpc

# What the clock tool and conversation turn times read in these tests.
FIXED_NOW = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)


async def refused(call: Awaitable[Any], code: grpc.StatusCode, field: str) -> None:
    """``call`` fails with ``code`` and a message that starts with the ``field`` it names."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code
    assert (caught.value.details() or "").startswith(field), caught.value.details()


def reference_config(orchestrator_address: str, **overrides: Any) -> ReferenceConfig:
    """Loopback, port 0, no delay between notices, fast reconnects."""
    base = ReferenceConfig(
        listen_address="127.0.0.1:0",
        orchestrator_address=orchestrator_address,
        step_delay_s=0.0,
        reconnect_base_s=0.02,
        reconnect_cap_s=0.2,
        stop_timeout_s=2.0,
    )
    return dataclasses.replace(base, **overrides)


@dataclasses.dataclass
class Stack:
    orchestrator: RecordingOrchestrator
    reference: ReferenceServices
    channel: grpc.aio.Channel

    @property
    def query(self) -> query_pb2_grpc.QueryServiceAsyncStub:
        return query_pb2_grpc.QueryServiceStub(self.channel)

    @property
    def embedding(self) -> embedding_pb2_grpc.EmbeddingServiceAsyncStub:
        return embedding_pb2_grpc.EmbeddingServiceStub(self.channel)

    @property
    def conversation(self) -> conversation_pb2_grpc.ConversationServiceAsyncStub:
        return conversation_pb2_grpc.ConversationServiceStub(self.channel)

    @property
    def agents(self) -> agents_pb2_grpc.AgentManagementServiceAsyncStub:
        return agents_pb2_grpc.AgentManagementServiceStub(self.channel)

    @property
    def tools(self) -> tools_pb2_grpc.ToolRegistryServiceAsyncStub:
        return tools_pb2_grpc.ToolRegistryServiceStub(self.channel)

    @property
    def agent_execution(self) -> agent_execution_pb2_grpc.AgentExecutionServiceAsyncStub:
        return agent_execution_pb2_grpc.AgentExecutionServiceStub(self.channel)

    @property
    def workflow(self) -> workflow_pb2_grpc.WorkflowEngineServiceAsyncStub:
        return workflow_pb2_grpc.WorkflowEngineServiceStub(self.channel)


@pytest.fixture
def overrides() -> dict[str, Any]:
    """Config overrides for the ``stack`` fixture; tests override it with parametrize."""
    return {}


@pytest.fixture
async def stack(overrides: dict[str, Any]) -> AsyncIterator[Stack]:
    orchestrator = RecordingOrchestrator()
    await orchestrator.start()
    reference = ReferenceServices(
        reference_config(orchestrator.address, **overrides), clock=lambda: FIXED_NOW
    )
    await reference.start()
    channel = grpc.aio.insecure_channel(reference.address)
    yield Stack(orchestrator, reference, channel)
    await channel.close(grace=None)
    await reference.stop(grace=0.1)
    await orchestrator.stop(None)

"""Each service that does a plan's work, down for good (nothing listens at its address, real
gRPC clients): the job fails with step_failed naming the run step and that service, after the
client retried within the job's deadline; the conversation gets no turns. An embedding is a plan
of one call, the work itself, and fails as any hand-off does, naming the service. (The synchronous
services down are in test_plans: conversation, tool registry, agent management.)"""

from __future__ import annotations

import pytest

from clients.downstream import DownstreamConfig, GrpcDispatcher
from clients.retry import RetryPolicy
from orchestrator.v1 import chat_pb2, chat_pb2_grpc, common_pb2, session_pb2, session_pb2_grpc
from tests.support.flow import Event, kind_of, read_events
from tests.support.platform import FakePlatform
from tests.support.redis_process import free_port
from tests.support.servers import running_server, tenant, test_settings

TENANT = "acme"


@pytest.mark.parametrize(
    ("agent_id", "kind", "code", "message"),
    [
        ("support-bot", common_pb2.WORK_KIND_LLM_QUERY, "step_failed", "run (query): "),
        ("tool-bot", common_pb2.WORK_KIND_LLM_QUERY, "step_failed", "run (agent_execution): "),
        ("research-flow", common_pb2.WORK_KIND_LLM_QUERY, "step_failed", "run (workflow_engine): "),
        ("support-bot", common_pb2.WORK_KIND_EMBEDDING, "downstream_unavailable", "embedding "),
    ],
)
async def test_the_work_service_down_fails_the_job_naming_it(
    backend_url: str | None,
    agent_id: str,
    kind: common_pb2.WorkKind.ValueType,
    code: str,
    message: str,
) -> None:
    nowhere = f"127.0.0.1:{free_port()}"  # nothing listens here
    policy = RetryPolicy(attempt_timeout_s=0.2, backoff_base_s=0.01, backoff_cap_s=0.05)
    dispatcher = GrpcDispatcher(DownstreamConfig(nowhere, nowhere, policy))
    platform = FakePlatform(TENANT)
    settings = test_settings(backend_url, plans=True, job_deadline=1.5)
    async with running_server(settings, dispatcher=dispatcher, platform=platform) as running:
        sessions = session_pb2_grpc.SessionServiceStub(running.channel)
        created = await sessions.CreateSession(
            session_pb2.CreateSessionRequest(agent_id=agent_id), metadata=tenant(TENANT)
        )
        request = chat_pb2.SendMessageRequest(
            session_id=created.session.session_id, content="hi", kind=kind
        )
        call = chat_pb2_grpc.ChatServiceStub(running.channel).SendMessage(
            request, metadata=tenant(TENANT), timeout=10
        )
        events: list[Event] = []
        while not events or kind_of(events[-1]) not in ("completed", "failed", "timed_out"):
            events.extend(await read_events(call, 1))
    failed = events[-1]
    assert kind_of(failed) == "failed", events[-1]
    assert failed.failed.error.code == code
    assert failed.failed.error.message.startswith(message)
    assert platform.conversation.turns == {}
    await dispatcher.aclose()

"""GrpcDispatcher routing work to Agent Execution and Workflow Engine (and the agent snapshot
Query now receives), against real grpc.aio servers on loopback with scripted servicers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from agent_execution.v1 import agent_execution_pb2, agent_execution_pb2_grpc
from clients.downstream import DownstreamConfig, GrpcDispatcher
from conversation.v1 import conversation_pb2
from domain.agents import ToolDefinition
from domain.conversation import Turn, TurnRole
from domain.dispatch import CallContext, DownstreamError, WorkRequest
from domain.models import Service, WorkKind
from query.v1 import query_pb2, query_pb2_grpc
from tests.clients.fakes import Script
from workflow.v1 import workflow_pb2, workflow_pb2_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
CTX = CallContext(tenant_id="acme", request_id="req-7", timeout_s=5.0, traceparent=TRACEPARENT)
HISTORY = (
    Turn(TurnRole.USER, "hi", job_id="job-0", time_ms=1_700_000_000_123, tokens=3),
    Turn(TurnRole.ASSISTANT, "hello", job_id="job-0", tokens=5),
)
TOOLS = (
    ToolDefinition("calculator", "adds numbers", '{"type":"object"}'),
    ToolDefinition("clock", "tells the time", "{}"),
)


class FakeQuery(query_pb2_grpc.QueryServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def SubmitQuery(
        self, request: query_pb2.SubmitQueryRequest, context: Ctx
    ) -> query_pb2.SubmitQueryResponse:
        await self.script.play("SubmitQuery", request, context)
        return query_pb2.SubmitQueryResponse(job_id=request.job_id)

    async def CancelQuery(
        self, request: query_pb2.CancelQueryRequest, context: Ctx
    ) -> query_pb2.CancelQueryResponse:
        await self.script.play("CancelQuery", request, context)
        return query_pb2.CancelQueryResponse(cancelled=True)


class FakeAgentExecution(agent_execution_pb2_grpc.AgentExecutionServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def StartRun(
        self, request: agent_execution_pb2.StartRunRequest, context: Ctx
    ) -> agent_execution_pb2.StartRunResponse:
        await self.script.play("StartRun", request, context)
        return agent_execution_pb2.StartRunResponse(job_id=request.job_id)

    async def CancelRun(
        self, request: agent_execution_pb2.CancelRunRequest, context: Ctx
    ) -> agent_execution_pb2.CancelRunResponse:
        await self.script.play("CancelRun", request, context)
        return agent_execution_pb2.CancelRunResponse(cancelled=True)


class FakeWorkflow(workflow_pb2_grpc.WorkflowEngineServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def StartWorkflow(
        self, request: workflow_pb2.StartWorkflowRequest, context: Ctx
    ) -> workflow_pb2.StartWorkflowResponse:
        await self.script.play("StartWorkflow", request, context)
        return workflow_pb2.StartWorkflowResponse(job_id="")  # empty: the client falls back

    async def CancelWorkflow(
        self, request: workflow_pb2.CancelWorkflowRequest, context: Ctx
    ) -> workflow_pb2.CancelWorkflowResponse:
        await self.script.play("CancelWorkflow", request, context)
        return workflow_pb2.CancelWorkflowResponse(cancelled=False)


@dataclass
class Fakes:
    query: Script
    runs: Script
    workflows: Script
    dispatcher: GrpcDispatcher
    addresses: list[str]


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    """Query, Agent Execution and Workflow Engine on three servers, so routing is observable."""
    query, runs, workflows = Script(), Script(), Script()
    servers = [grpc.aio.server() for _ in range(3)]
    query_pb2_grpc.add_QueryServiceServicer_to_server(FakeQuery(query), servers[0])
    agent_execution_pb2_grpc.add_AgentExecutionServiceServicer_to_server(
        FakeAgentExecution(runs), servers[1]
    )
    workflow_pb2_grpc.add_WorkflowEngineServiceServicer_to_server(
        FakeWorkflow(workflows), servers[2]
    )
    addresses = [f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}" for server in servers]
    for server in servers:
        await server.start()
    dispatcher = GrpcDispatcher(
        DownstreamConfig(
            query_address=addresses[0],
            embedding_address=addresses[0],
            attempt_timeout_s=2.0,
            backoff_base_s=0.01,
            backoff_cap_s=0.05,
            agent_execution_address=addresses[1],
            workflow_engine_address=addresses[2],
        )
    )
    yield Fakes(query, runs, workflows, dispatcher, addresses)
    await dispatcher.aclose()
    for server in servers:
        await server.stop(None)


def work(service: Service | None, job_id: str = "job-1") -> WorkRequest:
    return WorkRequest(
        job_id=job_id,
        tenant_id="acme",
        session_id="s-1",
        agent_id="tool-bot",
        kind=WorkKind.LLM_QUERY,
        content="what is 2+3?",
        model="m-2",
        run_service=service,
        system_prompt="be brief",
        history=HISTORY,
        tools=TOOLS,
        workflow_id="research",
        max_tool_calls=4,
        agent_version=9,
    )


def assert_history(history: object) -> None:
    turns = list(history)  # type: ignore[call-overload]
    assert [(t.role, t.content, t.job_id, t.tokens) for t in turns] == [
        (conversation_pb2.ROLE_USER, "hi", "job-0", 3),
        (conversation_pb2.ROLE_ASSISTANT, "hello", "job-0", 5),
    ]
    assert turns[0].time.ToMilliseconds() == 1_700_000_000_123
    assert not turns[1].HasField("time")


async def test_start_run_carries_the_agent_snapshot(fakes: Fakes) -> None:
    assert await fakes.dispatcher.submit(work(Service.AGENT_EXECUTION), CTX) == "job-1"
    [(method, request, metadata)] = fakes.runs.calls
    assert method == "StartRun"
    assert isinstance(request, agent_execution_pb2.StartRunRequest)
    assert (request.tenant_id, request.session_id, request.agent_id, request.job_id) == (
        "acme",
        "s-1",
        "tool-bot",
        "job-1",
    )
    assert (request.request_id, request.model, request.system_prompt, request.input) == (
        "req-7",
        "m-2",
        "be brief",
        "what is 2+3?",
    )
    assert_history(request.history)
    assert [(t.name, t.description, t.parameters_json_schema) for t in request.tools] == [
        ("calculator", "adds numbers", '{"type":"object"}'),
        ("clock", "tells the time", "{}"),
    ]
    assert (request.max_tool_calls, request.agent_version) == (4, 9)
    assert metadata["x-tenant-id"] == "acme"
    assert metadata["x-request-id"] == "req-7"
    assert metadata["traceparent"] == TRACEPARENT
    assert fakes.query.calls == fakes.workflows.calls == []


async def test_start_workflow_carries_the_workflow_and_falls_back_to_the_job_id(
    fakes: Fakes,
) -> None:
    assert await fakes.dispatcher.submit(work(Service.WORKFLOW_ENGINE, "job-w"), CTX) == "job-w"
    [(method, request, metadata)] = fakes.workflows.calls
    assert method == "StartWorkflow"
    assert isinstance(request, workflow_pb2.StartWorkflowRequest)
    assert (request.job_id, request.workflow_id, request.input, request.model) == (
        "job-w",
        "research",
        "what is 2+3?",
        "m-2",
    )
    assert (request.agent_id, request.agent_version, request.request_id) == ("tool-bot", 9, "req-7")
    assert_history(request.history)
    assert metadata["x-tenant-id"] == "acme"
    assert fakes.query.calls == fakes.runs.calls == []


async def test_query_gets_the_system_prompt_and_history(fakes: Fakes) -> None:
    await fakes.dispatcher.submit(work(None), CTX)
    [(method, request, _)] = fakes.query.calls
    assert method == "SubmitQuery"
    assert isinstance(request, query_pb2.SubmitQueryRequest)
    assert request.system_prompt == "be brief"
    assert_history(request.history)


async def test_cancel_routes_runs_and_workflows(fakes: Fakes) -> None:
    assert await fakes.dispatcher.cancel(Service.AGENT_EXECUTION, "job-r", CTX) is True
    assert await fakes.dispatcher.cancel(Service.WORKFLOW_ENGINE, "job-w", CTX) is False
    [(r_method, r_request, r_metadata)] = fakes.runs.calls
    [(w_method, w_request, _)] = fakes.workflows.calls
    assert r_method == "CancelRun"
    assert isinstance(r_request, agent_execution_pb2.CancelRunRequest)
    assert (r_request.tenant_id, r_request.job_id) == ("acme", "job-r")
    assert r_metadata["x-request-id"] == "req-7"
    assert w_method == "CancelWorkflow"
    assert isinstance(w_request, workflow_pb2.CancelWorkflowRequest)
    assert (w_request.tenant_id, w_request.job_id) == ("acme", "job-w")


@pytest.mark.parametrize("service", [Service.CONVERSATION, Service.TOOL_REGISTRY])
async def test_a_service_that_runs_no_jobs_is_refused(fakes: Fakes, service: Service) -> None:
    with pytest.raises(ValueError, match="does not run jobs"):
        await fakes.dispatcher.submit(work(service), CTX)
    with pytest.raises(ValueError, match="does not run jobs"):
        await fakes.dispatcher.cancel(service, "job-1", CTX)


async def test_start_run_retries_unavailable_with_the_same_job_id(fakes: Fakes) -> None:
    fakes.runs.unavailable = 2
    assert await fakes.dispatcher.submit(work(Service.AGENT_EXECUTION), CTX) == "job-1"
    assert len(fakes.runs.calls) == 3
    assert {call[1].job_id for call in fakes.runs.calls} == {"job-1"}  # type: ignore[attr-defined]


async def test_workflow_down_is_unavailable_naming_the_service(fakes: Fakes) -> None:
    fakes.workflows.unavailable = 10
    with pytest.raises(DownstreamError) as caught:
        await fakes.dispatcher.submit(work(Service.WORKFLOW_ENGINE), CTX)
    assert caught.value.code == "downstream_unavailable"
    assert caught.value.retryable is True
    assert "workflow_engine service (StartWorkflow at" in caught.value.message
    assert fakes.addresses[2] in caught.value.message
    assert len(fakes.workflows.calls) == 3


async def test_run_rejection_is_not_retried(fakes: Fakes) -> None:
    fakes.runs.abort = grpc.StatusCode.INVALID_ARGUMENT
    fakes.runs.abort_details = "no such tool"
    with pytest.raises(DownstreamError) as caught:
        await fakes.dispatcher.submit(work(Service.AGENT_EXECUTION), CTX)
    assert caught.value.code == "downstream_rejected"
    assert caught.value.retryable is False
    assert "no such tool" in caught.value.message
    assert len(fakes.runs.calls) == 1


async def test_the_caller_deadline_bounds_a_slow_run(fakes: Fakes) -> None:
    fakes.runs.delay_s = 5.0
    started = time.monotonic()
    with pytest.raises(DownstreamError) as caught:
        await fakes.dispatcher.submit(
            work(Service.AGENT_EXECUTION), CallContext("acme", "r", timeout_s=0.3)
        )
    assert caught.value.code == "downstream_timeout"
    assert time.monotonic() - started < 1.5
    assert len(fakes.runs.calls) == 1


def test_unset_platform_addresses_are_the_query_address() -> None:
    config = DownstreamConfig("query:1", "embedding:2", tool_registry_address="tools:3")
    assert config.address(Service.QUERY) == "query:1"
    assert config.address(Service.EMBEDDING) == "embedding:2"
    assert config.address(Service.TOOL_REGISTRY) == "tools:3"
    for service in (
        Service.AGENT_EXECUTION,
        Service.WORKFLOW_ENGINE,
        Service.CONVERSATION,
        Service.AGENT_MANAGEMENT,
    ):
        assert config.address(service) == "query:1"


async def test_a_service_missing_at_its_address_is_a_rejection(fakes: Fakes) -> None:
    """Agent Execution left unset goes to the Query address; a server there without it answers
    UNIMPLEMENTED, which is a rejection (not retried), not an outage."""
    dispatcher = GrpcDispatcher(DownstreamConfig(fakes.addresses[0], fakes.addresses[0]))
    try:
        await dispatcher.submit(work(None), CTX)
        with pytest.raises(DownstreamError) as caught:
            await dispatcher.submit(work(Service.AGENT_EXECUTION), CTX)
        assert caught.value.code == "downstream_rejected"
        assert "UNIMPLEMENTED" in caught.value.message
    finally:
        await dispatcher.aclose()
    assert len(fakes.query.calls) == 1

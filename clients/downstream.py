"""GrpcDispatcher: domain.dispatch.Dispatcher over the stubs of the services that run jobs
(Query, Embedding, Agent Execution, Workflow Engine), and ServiceCaller, the deadline, metadata,
retry and error mapping every downstream call shares (clients.platform uses it too)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from agent_execution.v1 import agent_execution_pb2, agent_execution_pb2_grpc
from clients.retry import RetryPolicy, call_with_retries
from conversation.v1 import conversation_pb2
from domain.agents import ToolDefinition
from domain.conversation import Turn, TurnRole
from domain.dispatch import CallContext, WorkRequest
from domain.models import Service, WorkKind
from domain.ports.tracing import NO_TRACING, SpanKind, Tracing
from embedding.v1 import embedding_pb2, embedding_pb2_grpc
from query.v1 import query_pb2, query_pb2_grpc
from tools.v1 import tools_pb2
from workflow.v1 import workflow_pb2, workflow_pb2_grpc

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Stub = TypeVar("Stub")

# Reconnect quickly after a downstream restart instead of gRPC's default backoff (up to 120 s).
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]

_QUERY_MODES = {
    WorkKind.LLM_QUERY: query_pb2.QUERY_MODE_LLM,
    WorkKind.RAG_QUERY: query_pb2.QUERY_MODE_RAG,
}
TURN_ROLES_TO_PB = {
    TurnRole.USER: conversation_pb2.ROLE_USER,
    TurnRole.ASSISTANT: conversation_pb2.ROLE_ASSISTANT,
}


@dataclass(frozen=True, slots=True)
class DownstreamConfig:
    """Where the downstream services are and how calls to them are retried (seconds). An empty
    address of one of the five platform services means ``query_address`` (where the embedded
    reference services all listen)."""

    query_address: str
    embedding_address: str
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    agent_execution_address: str = ""
    workflow_engine_address: str = ""
    conversation_address: str = ""
    agent_management_address: str = ""
    tool_registry_address: str = ""

    def address(self, service: Service) -> str:
        """The address calls to ``service`` go to."""
        configured = {
            Service.QUERY: self.query_address,
            Service.EMBEDDING: self.embedding_address,
            Service.AGENT_EXECUTION: self.agent_execution_address,
            Service.WORKFLOW_ENGINE: self.workflow_engine_address,
            Service.CONVERSATION: self.conversation_address,
            Service.AGENT_MANAGEMENT: self.agent_management_address,
            Service.TOOL_REGISTRY: self.tool_registry_address,
        }[service]
        return configured or self.query_address


def call_metadata(ctx: CallContext, traceparent: str | None = None) -> tuple[tuple[str, str], ...]:
    """Tenant, request id and (when present) W3C trace context for every downstream call:
    ``traceparent`` (the call's client span), else the context's."""
    metadata = [("x-tenant-id", ctx.tenant_id), ("x-request-id", ctx.request_id)]
    traceparent = traceparent or ctx.traceparent
    if traceparent:
        metadata.append(("traceparent", traceparent))
    return tuple(metadata)


# The full gRPC service name of each downstream service (span names and attributes).
_GRPC_SERVICES = {
    Service.QUERY: "query.v1.QueryService",
    Service.EMBEDDING: "embedding.v1.EmbeddingService",
    Service.AGENT_EXECUTION: "agent_execution.v1.AgentExecutionService",
    Service.WORKFLOW_ENGINE: "workflow.v1.WorkflowEngineService",
    Service.CONVERSATION: "conversation.v1.ConversationService",
    Service.AGENT_MANAGEMENT: "agents.v1.AgentManagementService",
    Service.TOOL_REGISTRY: "tools.v1.ToolRegistryService",
}


class ServiceCaller:
    """One long-lived channel per downstream address (opened on first use, shared by the
    services behind it) and unary calls with the shared deadline, metadata, retry and error
    mapping (clients.retry). With tracing on, each logical call (its retries included) is an
    OpenTelemetry client span ``<package.Service>/<Method>`` in the trace of the call's
    context (``CallContext.traceparent``), and the service gets that span as its parent."""

    def __init__(self, config: DownstreamConfig, tracing: Tracing = NO_TRACING) -> None:
        self.config = config
        self.tracing = tracing
        # Read once: with tracing off a call costs one attribute check more.
        self._traced = tracing.enabled
        # At least one attempt, whatever the configuration says.
        self._policy = replace(config.retry, max_attempts=max(1, config.retry.max_attempts))
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[Service, object] = {}

    def stub(self, service: Service, factory: Callable[[grpc.aio.Channel], Stub]) -> Stub:
        """The stub of ``service`` (``factory`` builds it over the service's channel)."""
        stub = self._stubs.get(service)
        if stub is None:
            address = self.config.address(service)
            channel = self._channels.get(address)
            if channel is None:
                channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
                self._channels[address] = channel
            stub = self._stubs[service] = factory(channel)
        return stub  # type: ignore[return-value]  # built by ``factory`` for this service

    async def unary(
        self,
        service: Service,
        name: str,
        method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        ctx: CallContext,
    ) -> Resp:
        """One logical call (``name`` on ``service``), retried within the caller's budget.
        Raises domain.dispatch.DownstreamError (its ``__cause__`` is the last gRPC error)."""
        with self._client_span(service, name, ctx) as traceparent:
            metadata = call_metadata(ctx, traceparent)

            async def attempt(attempt_s: float) -> Resp:
                return await method(request, timeout=attempt_s, metadata=metadata)

            return await call_with_retries(
                attempt,
                what=f"{service.value} service ({name} at {self.config.address(service)})",
                policy=self._policy,
                budget_s=ctx.timeout_s,
            )

    def _client_span(
        self, service: Service, name: str, ctx: CallContext
    ) -> AbstractContextManager[str | None]:
        """The client span of a call, yielding the traceparent to send (tracing off: no span,
        the context's traceparent)."""
        if not self._traced:
            return nullcontext(ctx.traceparent)
        grpc_service = _GRPC_SERVICES[service]
        attributes = {
            "rpc.system": "grpc",
            "rpc.service": grpc_service,
            "rpc.method": name,
            "server.address": self.config.address(service),
            "orchestrator.tenant": ctx.tenant_id,
        }
        return self.tracing.job_span(
            f"{grpc_service}/{name}", ctx.traceparent, kind=SpanKind.CLIENT, attributes=attributes
        )

    async def aclose(self) -> None:
        """Close every channel; they reopen if used again."""
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        for channel in channels:
            await channel.close(grace=None)


def turns_to_pb(turns: Iterable[Turn]) -> list[conversation_pb2.Turn]:
    """Domain turns as conversation.v1.Turn messages."""
    out = []
    for turn in turns:
        message = conversation_pb2.Turn(
            role=TURN_ROLES_TO_PB[turn.role],
            content=turn.content,
            job_id=turn.job_id,
            tokens=turn.tokens,
        )
        if turn.time_ms:
            message.time.FromMilliseconds(turn.time_ms)
        out.append(message)
    return out


def tools_to_pb(tools: Iterable[ToolDefinition]) -> list[tools_pb2.ToolDefinition]:
    return [
        tools_pb2.ToolDefinition(
            name=tool.name,
            description=tool.description,
            parameters_json_schema=tool.parameters_json,
        )
        for tool in tools
    ]


class _Submitted(Protocol):
    """What every submit reply carries: the job id the service runs the work under."""

    job_id: str


class _Cancelled(Protocol):
    """What every cancel reply carries: whether the job was still running."""

    cancelled: bool


class _CancelRequest(Protocol):
    def __call__(self, *, tenant_id: str, job_id: str) -> Message: ...


@dataclass(frozen=True, slots=True)
class _JobService:
    """How one service that runs jobs is called: its stub, the method that starts work there
    (with the request built from the work) and the method that cancels it."""

    stub: Callable[[grpc.aio.Channel], object]
    submit: str
    submit_request: Callable[[WorkRequest, CallContext], Message]
    cancel: str
    cancel_request: _CancelRequest


class GrpcDispatcher:
    """Hands work to the service that runs it and cancels it there."""

    def __init__(self, config: DownstreamConfig, tracing: Tracing = NO_TRACING) -> None:
        self.config = config
        self.caller = ServiceCaller(config, tracing)

    async def submit(self, work: WorkRequest, ctx: CallContext) -> str:
        """Start the work under ``work.job_id``; retrying is safe because the id is fixed."""
        job_service = _job_service(work.service)
        request = job_service.submit_request(work, ctx)
        reply: _Submitted = await self._call(work.service, job_service.submit, request, ctx)
        return reply.job_id or work.job_id

    async def cancel(self, service: Service, job_id: str, ctx: CallContext) -> bool:
        """Ask the service that runs the job to stop it; True when it was still running."""
        job_service = _job_service(service)
        request = job_service.cancel_request(tenant_id=ctx.tenant_id, job_id=job_id)
        reply: _Cancelled = await self._call(service, job_service.cancel, request, ctx)
        return reply.cancelled

    async def _call(self, service: Service, name: str, request: Message, ctx: CallContext) -> Any:
        """The reply of method ``name`` of ``service``'s stub to ``request``."""
        stub = self.caller.stub(service, _JOB_SERVICES[service].stub)
        return await self.caller.unary(service, name, getattr(stub, name), request, ctx)

    async def aclose(self) -> None:
        """Close the channels; the dispatcher reopens them if used again."""
        await self.caller.aclose()


def _job_service(service: Service) -> _JobService:
    job_service = _JOB_SERVICES.get(service)
    if job_service is None:
        raise ValueError(f"{service.value} does not run jobs")
    return job_service


def _embedding_request(work: WorkRequest, ctx: CallContext) -> embedding_pb2.SubmitEmbeddingRequest:
    return embedding_pb2.SubmitEmbeddingRequest(
        tenant_id=work.tenant_id,
        session_id=work.session_id,
        texts=[work.content],
        model=work.model,
        request_id=ctx.request_id,
        job_id=work.job_id,
    )


def _agent_work(work: WorkRequest, ctx: CallContext) -> dict[str, Any]:
    """The fields a start of agent work carries whichever service runs it (StartRun and
    StartWorkflow): whose, which job, the model, the message and the conversation so far."""
    return {
        "tenant_id": work.tenant_id,
        "session_id": work.session_id,
        "agent_id": work.agent_id,
        "job_id": work.job_id,
        "request_id": ctx.request_id,
        "model": work.model,
        "input": work.content,
        "history": turns_to_pb(work.history),
        "agent_version": work.agent_version,
    }


def _run_request(work: WorkRequest, ctx: CallContext) -> agent_execution_pb2.StartRunRequest:
    return agent_execution_pb2.StartRunRequest(
        **_agent_work(work, ctx),
        system_prompt=work.system_prompt,
        tools=tools_to_pb(work.tools),
        max_tool_calls=work.max_tool_calls,
    )


def _workflow_request(work: WorkRequest, ctx: CallContext) -> workflow_pb2.StartWorkflowRequest:
    return workflow_pb2.StartWorkflowRequest(**_agent_work(work, ctx), workflow_id=work.workflow_id)


def _query_request(work: WorkRequest, ctx: CallContext) -> query_pb2.SubmitQueryRequest:
    return query_pb2.SubmitQueryRequest(
        tenant_id=work.tenant_id,
        session_id=work.session_id,
        agent_id=work.agent_id,
        prompt=work.content,
        mode=_QUERY_MODES.get(work.kind, query_pb2.QUERY_MODE_LLM),
        model=work.model,
        collections=list(work.collections),
        request_id=ctx.request_id,
        job_id=work.job_id,
        system_prompt=work.system_prompt,
        history=turns_to_pb(work.history),
    )


_JOB_SERVICES = {
    Service.QUERY: _JobService(
        query_pb2_grpc.QueryServiceStub,
        "SubmitQuery",
        _query_request,
        "CancelQuery",
        query_pb2.CancelQueryRequest,
    ),
    Service.EMBEDDING: _JobService(
        embedding_pb2_grpc.EmbeddingServiceStub,
        "SubmitEmbedding",
        _embedding_request,
        "CancelEmbedding",
        embedding_pb2.CancelEmbeddingRequest,
    ),
    Service.AGENT_EXECUTION: _JobService(
        agent_execution_pb2_grpc.AgentExecutionServiceStub,
        "StartRun",
        _run_request,
        "CancelRun",
        agent_execution_pb2.CancelRunRequest,
    ),
    Service.WORKFLOW_ENGINE: _JobService(
        workflow_pb2_grpc.WorkflowEngineServiceStub,
        "StartWorkflow",
        _workflow_request,
        "CancelWorkflow",
        workflow_pb2.CancelWorkflowRequest,
    ),
}

"""GrpcDispatcher: domain.dispatch.Dispatcher over the stubs of the services that run jobs
(Query, Embedding, Agent Execution, Workflow Engine), and ServiceCaller, the deadline, metadata,
retry and error mapping every downstream call shares (clients.platform uses it too)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from agent_execution.v1 import agent_execution_pb2, agent_execution_pb2_grpc
from clients.retry import RetryPolicy, call_with_retries
from conversation.v1 import conversation_pb2
from domain.agents import ToolDefinition
from domain.conversation import Turn, TurnRole
from domain.dispatch import CallContext, WorkRequest
from domain.models import Service, WorkKind
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
_TURN_ROLES = {
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
    attempt_timeout_s: float = 5.0
    max_attempts: int = 3
    backoff_base_s: float = 0.05
    backoff_cap_s: float = 1.0
    agent_execution_address: str = ""
    workflow_engine_address: str = ""
    conversation_address: str = ""
    agent_management_address: str = ""
    tool_registry_address: str = ""

    @property
    def policy(self) -> RetryPolicy:
        return RetryPolicy(
            attempt_timeout_s=self.attempt_timeout_s,
            max_attempts=max(1, self.max_attempts),
            backoff_base_s=self.backoff_base_s,
            backoff_cap_s=self.backoff_cap_s,
        )

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


def call_metadata(ctx: CallContext) -> tuple[tuple[str, str], ...]:
    """Tenant, request id and (when present) W3C trace context for every downstream call."""
    metadata = [("x-tenant-id", ctx.tenant_id), ("x-request-id", ctx.request_id)]
    if ctx.traceparent:
        metadata.append(("traceparent", ctx.traceparent))
    return tuple(metadata)


class ServiceCaller:
    """One long-lived channel per downstream address (opened on first use, shared by the
    services behind it) and unary calls with the shared deadline, metadata, retry and error
    mapping (clients.retry)."""

    def __init__(self, config: DownstreamConfig) -> None:
        self.config = config
        self._policy = config.policy
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
        metadata = call_metadata(ctx)

        async def attempt(attempt_s: float) -> Resp:
            return await method(request, timeout=attempt_s, metadata=metadata)

        return await call_with_retries(
            attempt,
            what=f"{service.value} service ({name} at {self.config.address(service)})",
            policy=self._policy,
            budget_s=ctx.timeout_s,
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
            role=_TURN_ROLES[turn.role],
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


class GrpcDispatcher:
    """Hands work to the service that runs it and cancels it there."""

    def __init__(self, config: DownstreamConfig) -> None:
        self.config = config
        self.caller = ServiceCaller(config)

    def _query(self) -> query_pb2_grpc.QueryServiceAsyncStub:
        return self.caller.stub(Service.QUERY, query_pb2_grpc.QueryServiceStub)

    def _embedding(self) -> embedding_pb2_grpc.EmbeddingServiceAsyncStub:
        return self.caller.stub(Service.EMBEDDING, embedding_pb2_grpc.EmbeddingServiceStub)

    def _agent_execution(self) -> agent_execution_pb2_grpc.AgentExecutionServiceAsyncStub:
        return self.caller.stub(
            Service.AGENT_EXECUTION,
            agent_execution_pb2_grpc.AgentExecutionServiceStub,
        )

    def _workflow(self) -> workflow_pb2_grpc.WorkflowEngineServiceAsyncStub:
        return self.caller.stub(
            Service.WORKFLOW_ENGINE,
            workflow_pb2_grpc.WorkflowEngineServiceStub,
        )

    async def submit(self, work: WorkRequest, ctx: CallContext) -> str:
        """Start the work under ``work.job_id``; retrying is safe because the id is fixed."""
        service = work.service
        unary = self.caller.unary
        if service is Service.EMBEDDING:
            embed_request = embedding_pb2.SubmitEmbeddingRequest(
                tenant_id=work.tenant_id,
                session_id=work.session_id,
                texts=[work.content],
                model=work.model,
                request_id=ctx.request_id,
                job_id=work.job_id,
            )
            stub = self._embedding()
            reply = await unary(
                service, "SubmitEmbedding", stub.SubmitEmbedding, embed_request, ctx
            )
            return reply.job_id or work.job_id
        if service is Service.AGENT_EXECUTION:
            run_request = agent_execution_pb2.StartRunRequest(
                tenant_id=work.tenant_id,
                session_id=work.session_id,
                agent_id=work.agent_id,
                job_id=work.job_id,
                request_id=ctx.request_id,
                model=work.model,
                system_prompt=work.system_prompt,
                input=work.content,
                history=turns_to_pb(work.history),
                tools=tools_to_pb(work.tools),
                max_tool_calls=work.max_tool_calls,
                agent_version=work.agent_version,
            )
            run_stub = self._agent_execution()
            run_reply = await unary(service, "StartRun", run_stub.StartRun, run_request, ctx)
            return run_reply.job_id or work.job_id
        if service is Service.WORKFLOW_ENGINE:
            flow_request = workflow_pb2.StartWorkflowRequest(
                tenant_id=work.tenant_id,
                session_id=work.session_id,
                agent_id=work.agent_id,
                job_id=work.job_id,
                request_id=ctx.request_id,
                workflow_id=work.workflow_id,
                model=work.model,
                input=work.content,
                history=turns_to_pb(work.history),
                agent_version=work.agent_version,
            )
            flow_stub = self._workflow()
            flow_reply = await unary(
                service, "StartWorkflow", flow_stub.StartWorkflow, flow_request, ctx
            )
            return flow_reply.job_id or work.job_id
        if service is not Service.QUERY:
            raise ValueError(f"{service.value} does not run jobs")
        query_request = query_pb2.SubmitQueryRequest(
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
        query_stub = self._query()
        query_reply = await unary(
            service, "SubmitQuery", query_stub.SubmitQuery, query_request, ctx
        )
        return query_reply.job_id or work.job_id

    async def cancel(self, service: Service, job_id: str, ctx: CallContext) -> bool:
        """Ask the service that runs the job to stop it; True when it was still running."""
        unary = self.caller.unary
        if service is Service.EMBEDDING:
            embed_cancel = embedding_pb2.CancelEmbeddingRequest(
                tenant_id=ctx.tenant_id, job_id=job_id
            )
            stub = self._embedding()
            reply = await unary(service, "CancelEmbedding", stub.CancelEmbedding, embed_cancel, ctx)
            return reply.cancelled
        if service is Service.AGENT_EXECUTION:
            run_cancel = agent_execution_pb2.CancelRunRequest(
                tenant_id=ctx.tenant_id, job_id=job_id
            )
            run_stub = self._agent_execution()
            run_reply = await unary(service, "CancelRun", run_stub.CancelRun, run_cancel, ctx)
            return run_reply.cancelled
        if service is Service.WORKFLOW_ENGINE:
            flow_cancel = workflow_pb2.CancelWorkflowRequest(tenant_id=ctx.tenant_id, job_id=job_id)
            flow_stub = self._workflow()
            flow_reply = await unary(
                service, "CancelWorkflow", flow_stub.CancelWorkflow, flow_cancel, ctx
            )
            return flow_reply.cancelled
        if service is not Service.QUERY:
            raise ValueError(f"{service.value} does not run jobs")
        query_cancel = query_pb2.CancelQueryRequest(tenant_id=ctx.tenant_id, job_id=job_id)
        query_stub = self._query()
        query_reply = await unary(service, "CancelQuery", query_stub.CancelQuery, query_cancel, ctx)
        return query_reply.cancelled

    async def aclose(self) -> None:
        """Close the channels; the dispatcher reopens them if used again."""
        await self.caller.aclose()

"""ReferenceServices: one grpc.aio server hosting the reference platform services (Query,
Embedding, Conversation, Agent Management, Tool Registry, Agent Execution, Workflow Engine),
health and reflection, plus the reporter that streams their notices to the orchestrator."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agent_execution.v1 import agent_execution_pb2, agent_execution_pb2_grpc
from agents.v1 import agents_pb2, agents_pb2_grpc
from conversation.v1 import conversation_pb2, conversation_pb2_grpc
from embedding.v1 import embedding_pb2, embedding_pb2_grpc
from query.v1 import query_pb2, query_pb2_grpc
from reference.agent_execution import AgentExecutionServicer
from reference.agents import AgentBook, AgentManagementServicer
from reference.config import ReferenceConfig
from reference.conversation import ConversationLog, ConversationServicer
from reference.reporter import Reporter
from reference.services import EmbeddingServicer, QueryServicer, Runtime, Seen
from reference.tool_registry import ToolRegistryServicer
from reference.tools import Clock, ToolBox, system_clock
from reference.workflows import WorkflowEngineServicer
from tools.v1 import tools_pb2, tools_pb2_grpc
from workflow.v1 import workflow_pb2, workflow_pb2_grpc

log = logging.getLogger(__name__)

# The proto files of the hosted services; health and reflection serve every service they declare.
SERVICE_FILES = (
    query_pb2,
    embedding_pb2,
    conversation_pb2,
    agents_pb2,
    tools_pb2,
    agent_execution_pb2,
    workflow_pb2,
)
SERVICE_NAMES = tuple(
    service.full_name
    for file in SERVICE_FILES
    for service in file.DESCRIPTOR.services_by_name.values()
)


class ReferenceServices:
    """Build with a config, ``await start()`` (returns the bound port), ``await stop()``.
    ``clock`` is what the clock tool and the conversation's turn times read (fixed in tests);
    ``agents`` changes agent configurations (reporting AGENT_CHANGED)."""

    def __init__(self, config: ReferenceConfig, *, clock: Clock = system_clock) -> None:
        config.validate()
        self.config = config
        self.reporter = Reporter(
            config.orchestrator_address,
            config.publish_metadata,
            reconnect_base_s=config.reconnect_base_s,
            reconnect_cap_s=config.reconnect_cap_s,
        )
        self.runtime = Runtime(config, self.reporter)
        self.toolbox = ToolBox(clock)
        self.conversations = ConversationLog(clock)
        self.agents = AgentBook(self.reporter, config.demo_tenants)
        self._server: grpc.aio.Server | None = None
        self._port = 0

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        """Loopback address of the running server (for clients in the same host)."""
        return f"127.0.0.1:{self._port}"

    @property
    def seen(self) -> list[Seen]:
        """The latest submits received (at most SEEN_LIMIT): (method, job_id, tenant_id,
        request_id, traceparent)."""
        return list(self.runtime.seen)

    async def start(self) -> int:
        server = grpc.aio.server()
        query_pb2_grpc.add_QueryServiceServicer_to_server(QueryServicer(self.runtime), server)
        embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(
            EmbeddingServicer(self.runtime), server
        )
        conversation_pb2_grpc.add_ConversationServiceServicer_to_server(
            ConversationServicer(self.conversations), server
        )
        agents_pb2_grpc.add_AgentManagementServiceServicer_to_server(
            AgentManagementServicer(self.agents), server
        )
        tools_pb2_grpc.add_ToolRegistryServiceServicer_to_server(
            ToolRegistryServicer(self.toolbox), server
        )
        agent_execution_pb2_grpc.add_AgentExecutionServiceServicer_to_server(
            AgentExecutionServicer(self.runtime, self.toolbox), server
        )
        workflow_pb2_grpc.add_WorkflowEngineServiceServicer_to_server(
            WorkflowEngineServicer(self.runtime), server
        )
        health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        for name in ("", *SERVICE_NAMES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        port = server.add_insecure_port(self.config.listen_address)
        if port == 0:
            raise RuntimeError(f"could not bind {self.config.listen_address}")
        self.reporter.start()
        await server.start()
        self._server, self._port = server, port
        log.info(
            "reference platform services on %s (port %d), reporting to %s",
            self.config.listen_address,
            port,
            self.config.orchestrator_address,
        )
        return port

    async def stop(self, grace: float = 1.0) -> None:
        """Stop taking calls, cancel running jobs, flush notices and close the stream."""
        if self._server is None:
            return
        server, self._server = self._server, None
        await server.stop(grace)
        await self.runtime.jobs.close()
        await self.runtime.platform.close()
        await self.reporter.stop(self.config.stop_timeout_s)
        log.info("reference services stopped")

    async def serve_until_signalled(self) -> None:
        """Run until SIGTERM or SIGINT."""
        await self.start()
        stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        await stop_requested.wait()
        await self.stop()

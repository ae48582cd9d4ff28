"""What the job flow needs from the platform's downstream services (implemented in clients/).

The orchestrator assigns every job id itself and hands it to the service, so a job is recorded
before any notice about it can arrive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from domain.agents import ToolDefinition
from domain.conversation import Turn
from domain.models import Service, WorkKind


@dataclass(frozen=True, slots=True)
class CallContext:
    """Per-call context propagated to downstream calls.

    ``timeout_s`` is the time the caller has left (None: no deadline); clients cap each attempt
    by it. ``traceparent`` is a W3C trace context header value, passed through when present.
    """

    tenant_id: str
    request_id: str
    timeout_s: float | None = None
    traceparent: str | None = None


@dataclass(frozen=True, slots=True)
class WorkRequest:
    """One piece of work for a downstream service.

    Without ``run_service`` the work kind decides the service (Query, or Embedding); a plan
    sets it to the service of its run step (domain.plans.OrchestrationPlan.run_service), e.g.
    Agent Execution for a ``tool_agent``. The agent's snapshot and the history window go with
    the work: Query gets ``system_prompt`` and ``history``; Agent Execution also ``tools``,
    ``max_tool_calls`` and ``agent_version``; Workflow Engine ``workflow_id``, ``history`` and
    ``agent_version``.
    """

    job_id: str
    tenant_id: str
    session_id: str
    agent_id: str
    kind: WorkKind
    content: str
    model: str = ""
    collections: Sequence[str] = field(default_factory=tuple)
    run_service: Service | None = None
    system_prompt: str = ""
    history: tuple[Turn, ...] = ()
    tools: tuple[ToolDefinition, ...] = ()
    workflow_id: str = ""
    max_tool_calls: int = 0
    agent_version: int = 0

    @property
    def service(self) -> Service:
        return self.run_service or Service.for_kind(self.kind)


class DownstreamError(Exception):
    """A downstream call failed. ``code`` is a short machine-readable reason
    (``downstream_unavailable``, ``downstream_timeout``, ``downstream_rejected``...)."""

    def __init__(self, code: str, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


class Dispatcher(Protocol):
    """Hands work to the downstream services and cancels it."""

    async def submit(self, work: WorkRequest, ctx: CallContext) -> str:
        """Start the work; returns the job id the service reports under (``work.job_id``).
        Raises DownstreamError when the service cannot take it."""
        ...

    async def cancel(self, service: Service, job_id: str, ctx: CallContext) -> bool:
        """Ask the service to stop a job; True when it was still running. Raises
        DownstreamError when the service cannot be reached."""
        ...

    async def aclose(self) -> None:
        """Close channels."""
        ...

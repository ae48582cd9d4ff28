"""Orchestration plans: what a chat message becomes, as an ordered list of service calls.

A plan is chosen when the job starts, from the message's kind and the session's agent
(``plan_for``), and is stored with the job; every call's state, attempts, times and error are
recorded as it runs (the work's call and the append after it are settled by the job's state,
domain.jobs.plan_of) and returned by AdminService.GetTask; clients see a ``plan_step`` event
for each call before the work once it is done, and for a call that failed. The calls before the
work itself (history, tools) and the hand-over of the work run under the job's hand-off lease,
so a process that dies mid-plan leaves the rest to any other process (domain.handoff), which
resumes at the first call that had not finished. The calls after the work (appending the turns
to Conversation) run while the job is FINISHING, under a lease of the same kind. Calls carry
the job id as idempotency key: a resumed plan appends a conversation turn once.

For an embedding message the plan is one call: the embedding itself. Any other message goes by
the session's agent:

    llm:        load_agent -> load_history -> query (LLM, or RAG with collections) -> append_history
    tool_agent: load_agent -> load_history -> resolve_tools -> agent_execution -> append_history
    workflow:   load_agent -> load_history -> workflow_engine -> append_history
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from domain.agents import AgentConfig, AgentKind
from domain.models import Service, WorkKind


class StepName(enum.StrEnum):
    LOAD_AGENT = "load_agent"
    LOAD_HISTORY = "load_history"
    RESOLVE_TOOLS = "resolve_tools"
    # The work itself, handed to an asynchronous service that reports over TaskUpdateService.
    RUN = "run"
    APPEND_HISTORY = "append_history"


class StepState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    # Not needed after all (for example the job ended before the step's turn).
    SKIPPED = "skipped"

    @property
    def is_final(self) -> bool:
        return self in (StepState.DONE, StepState.FAILED, StepState.SKIPPED)


@dataclass(frozen=True, slots=True)
class ServiceCall:
    """One call of a plan (the design's ServiceCall)."""

    name: StepName
    service: Service
    method: str
    state: StepState = StepState.PENDING
    attempts: int = 0
    started_ms: int = 0
    ended_ms: int = 0
    # {code, message, retryable} when the call failed.
    error: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name.value,
            "service": self.service.value,
            "method": self.method,
            "state": self.state.value,
            "attempts": self.attempts,
            "started_ms": self.started_ms,
            "ended_ms": self.ended_ms,
        }
        if self.error is not None:
            out["error"] = dict(self.error)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ServiceCall:
        error = data.get("error")
        return cls(
            name=StepName(data["name"]),
            service=Service(data["service"]),
            method=str(data["method"]),
            state=StepState(data.get("state", StepState.PENDING.value)),
            attempts=int(data.get("attempts", 0)),
            started_ms=int(data.get("started_ms", 0)),
            ended_ms=int(data.get("ended_ms", 0)),
            error=dict(error) if isinstance(error, Mapping) else None,
        )


@dataclass(frozen=True, slots=True)
class OrchestrationPlan:
    """The calls a job makes, in order (the design's OrchestrationPlan). ``agent_version`` is
    the version of the agent configuration the plan was made from (0: no agent involved)."""

    calls: tuple[ServiceCall, ...]
    agent_kind: AgentKind | None = None
    agent_version: int = 0

    @property
    def run_service(self) -> Service:
        """The service that does the work itself (the RUN call's)."""
        return self.call(StepName.RUN).service

    def call(self, name: StepName) -> ServiceCall:
        for call in self.calls:
            if call.name is name:
                return call
        raise KeyError(name)

    def index(self, name: StepName) -> int:
        for i, call in enumerate(self.calls):
            if call.name is name:
                return i
        raise KeyError(name)

    def has(self, name: StepName) -> bool:
        return any(call.name is name for call in self.calls)

    def with_call(self, updated: ServiceCall) -> OrchestrationPlan:
        calls = tuple(updated if c.name is updated.name else c for c in self.calls)
        return replace(self, calls=calls)

    @property
    def appends_history(self) -> bool:
        """Whether calls follow the work (the job turns FINISHING on its completion)."""
        return self.has(StepName.APPEND_HISTORY)

    def step_event(self, call: ServiceCall) -> dict[str, Any]:
        """The data of the ``plan_step`` event reporting ``call`` (one of this plan's)."""
        data: dict[str, Any] = {
            "index": self.index(call.name),
            "name": call.name.value,
            "service": call.service.value,
            "method": call.method,
            "state": call.state.value,
            "attempts": call.attempts,
        }
        if call.started_ms:
            data["started_ms"] = call.started_ms
        if call.ended_ms:
            data["ended_ms"] = call.ended_ms
        if call.error is not None:
            data["error"] = dict(call.error)
        return data

    def to_json(self) -> dict[str, Any]:
        return {
            "calls": [c.to_json() for c in self.calls],
            "agent_kind": self.agent_kind.value if self.agent_kind else "",
            "agent_version": self.agent_version,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OrchestrationPlan:
        kind = data.get("agent_kind") or ""
        return cls(
            calls=tuple(ServiceCall.from_json(c) for c in data.get("calls", ())),
            agent_kind=AgentKind(kind) if kind else None,
            agent_version=int(data.get("agent_version", 0)),
        )


# The method each step calls on its service (as the protos name them).
_RUN_METHODS = {
    Service.QUERY: "SubmitQuery",
    Service.EMBEDDING: "SubmitEmbedding",
    Service.AGENT_EXECUTION: "StartRun",
    Service.WORKFLOW_ENGINE: "StartWorkflow",
}
_RUN_SERVICES = {
    AgentKind.LLM: Service.QUERY,
    AgentKind.TOOL_AGENT: Service.AGENT_EXECUTION,
    AgentKind.WORKFLOW: Service.WORKFLOW_ENGINE,
}


def _run(service: Service) -> ServiceCall:
    return ServiceCall(StepName.RUN, service, _RUN_METHODS[service])


def plan_for(kind: WorkKind, agent: AgentConfig | None, *, now_ms: int) -> OrchestrationPlan:
    """The plan for a message of ``kind`` on a session of ``agent`` (already loaded at
    ``now_ms``: its call is recorded done). An embedding is one call; a RAG query goes to Query
    whatever the agent; ``agent`` None (an embedding) plans no agent steps."""
    if kind is WorkKind.EMBEDDING or agent is None:
        service = Service.for_kind(kind)
        return OrchestrationPlan(calls=(_run(service),))
    loaded = ServiceCall(
        StepName.LOAD_AGENT,
        Service.AGENT_MANAGEMENT,
        "GetAgent",
        state=StepState.DONE,
        attempts=1,
        started_ms=now_ms,
        ended_ms=now_ms,
    )
    calls = [loaded, ServiceCall(StepName.LOAD_HISTORY, Service.CONVERSATION, "ListHistory")]
    service = Service.QUERY if kind is WorkKind.RAG_QUERY else _RUN_SERVICES[agent.kind]
    if service is Service.AGENT_EXECUTION:
        calls.append(ServiceCall(StepName.RESOLVE_TOOLS, Service.TOOL_REGISTRY, "ResolveTools"))
    calls.append(_run(service))
    calls.append(ServiceCall(StepName.APPEND_HISTORY, Service.CONVERSATION, "AppendTurns"))
    return OrchestrationPlan(calls=tuple(calls), agent_kind=agent.kind, agent_version=agent.version)

"""orchestrator.admin.v1.AdminService: API keys, tasks, token usage and the agent cache for
operators (admin role)."""

from __future__ import annotations

from collections.abc import Mapping

from domain.admin import AdminQueries, TenantUsage
from domain.agent_directory import CachedAgentDirectory
from domain.api_keys import ApiKeyManager
from domain.identity import Role
from domain.internal_calls import internal_steps
from domain.jobs import Job, JobState, plan_of
from domain.ports.api_keys import ApiKey
from handlers.audit import admin_rpc
from handlers.call_context import Ctx
from handlers.converters import enum_to_pb, timestamp_from_ms, usage_to_pb
from handlers.event_converters import (
    KIND_TO_PB,
    SERVICE_TO_PB,
    plan_step_from_data,
    service_from_pb,
)
from orchestrator.admin.v1 import admin_pb2, admin_pb2_grpc

_ROLE_TO_PB = enum_to_pb(Role, admin_pb2.ApiKeyRole, "API_KEY_ROLE_")
_ROLE_FROM_PB = {value: role.value for role, value in _ROLE_TO_PB.items()}
# FINISHING (the service completed the job and the plan's last calls run) is still running for
# an operator; the Task's plan shows which call.
_STATE_TO_PB = {
    **enum_to_pb(
        JobState,
        admin_pb2.TaskState,
        "TASK_STATE_",
        [state for state in JobState if state is not JobState.FINISHING],
    ),
    JobState.FINISHING: admin_pb2.TASK_STATE_RUNNING,
}


def task_state_to_pb(state: JobState) -> admin_pb2.TaskState.ValueType:
    return _STATE_TO_PB[state]


def task_to_pb(job: Job) -> admin_pb2.Task:
    plan = plan_of(job)
    return admin_pb2.Task(
        job_id=job.job_id,
        tenant_id=job.tenant_id,
        session_id=job.session_id,
        agent_id=job.agent_id,
        service=SERVICE_TO_PB[job.service],
        kind=KIND_TO_PB[job.kind],
        state=_STATE_TO_PB[job.state],
        request_id=job.request_id,
        model=job.model,
        create_time=timestamp_from_ms(job.created_at_ms),
        update_time=timestamp_from_ms(job.updated_at_ms),
        deadline_time=timestamp_from_ms(job.deadline_ms),
        last_notice_sequence=job.last_notice_sequence,
        usage=usage_to_pb(job.usage),
        plan=[plan_step_from_data(plan.step_event(call)) for call in plan.calls],
        agent_version=plan.agent_version,
        agent_kind=plan.agent_kind.value if plan.agent_kind else "",
    )


def _agents_to_pb(agents: Mapping[str, int]) -> list[admin_pb2.AgentUsage]:
    return [
        admin_pb2.AgentUsage(agent_id=agent, total_tokens=tokens)
        for agent, tokens in sorted(agents.items())
    ]


def tenant_usage_to_pb(usage: TenantUsage) -> admin_pb2.GetTenantUsageResponse:
    report = usage.report
    return admin_pb2.GetTenantUsageResponse(
        tenant_id=report.tenant_id,
        start_date=report.first.isoformat(),
        end_date=report.last.isoformat(),
        days=[
            admin_pb2.DayUsage(
                date=day.date.isoformat(),
                usage=usage_to_pb(day.usage),
                completed_tasks=day.jobs,
                agents=_agents_to_pb(day.agents),
            )
            for day in report.days
        ],
        total=usage_to_pb(report.total),
        completed_tasks=report.jobs,
        agents=_agents_to_pb(report.agents),
        daily_token_budget=usage.daily_budget,
        tokens_today=usage.tokens_today,
    )


def api_key_to_pb(key: ApiKey) -> admin_pb2.ApiKey:
    """The public record of a key (never its secret or hash)."""
    message = admin_pb2.ApiKey(
        key_id=key.key_id,
        tenant_id=key.tenant_id,
        role=_ROLE_TO_PB[key.role],
        description=key.description,
        create_time=timestamp_from_ms(key.created_at_ms),
        revoked=key.revoked,
        services=sorted(SERVICE_TO_PB[service] for service in key.services),
    )
    if key.revoked_at_ms is not None:
        message.revoke_time.CopyFrom(timestamp_from_ms(key.revoked_at_ms))
    return message


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """Thin adapter over domain.api_keys.ApiKeyManager, domain.admin.AdminQueries and the
    cached agent directory (domain.agent_directory)."""

    def __init__(
        self, keys: ApiKeyManager, queries: AdminQueries, agents: CachedAgentDirectory
    ) -> None:
        self._keys = keys
        self._queries = queries
        self._agents = agents

    @admin_rpc("tenant_id")
    async def CreateApiKey(
        self, request: admin_pb2.CreateApiKeyRequest, context: Ctx
    ) -> admin_pb2.CreateApiKeyResponse:
        # An unset or unknown role maps to "", which the domain refuses as InvalidArgument.
        role = _ROLE_FROM_PB.get(request.role, "")
        # UNSPECIFIED and unknown numbers map to None, which the domain refuses naming the entry.
        services = [service_from_pb(value) for value in request.services]
        issued = await self._keys.create(request.tenant_id, role, request.description, services)
        return admin_pb2.CreateApiKeyResponse(
            key_id=issued.record.key_id,
            api_key=issued.api_key,
            key=api_key_to_pb(issued.record),
        )

    @admin_rpc("tenant_id")
    async def ListApiKeys(
        self, request: admin_pb2.ListApiKeysRequest, context: Ctx
    ) -> admin_pb2.ListApiKeysResponse:
        page = await self._keys.list(request.tenant_id, request.page_size, request.page_token)
        return admin_pb2.ListApiKeysResponse(
            keys=[api_key_to_pb(key) for key in page.items],
            next_page_token=page.next_cursor or "",
        )

    @admin_rpc("key_id")
    async def RevokeApiKey(
        self, request: admin_pb2.RevokeApiKeyRequest, context: Ctx
    ) -> admin_pb2.RevokeApiKeyResponse:
        revoked = await self._keys.revoke(request.key_id)
        return admin_pb2.RevokeApiKeyResponse(key=api_key_to_pb(revoked))

    @admin_rpc("tenant_id", "job_id")
    async def GetTask(
        self, request: admin_pb2.GetTaskRequest, context: Ctx
    ) -> admin_pb2.GetTaskResponse:
        job = await self._queries.get_task(request.tenant_id, request.job_id)
        task = task_to_pb(job)
        # The internal calls the service made for the job (domain.internal_calls) go right
        # after the call that ran the work, the steps renumbered.
        calls = internal_steps(await self._queries.internal_calls(job), 0)
        if calls:
            steps = list(task.plan)
            after = next((i + 1 for i, s in enumerate(steps) if s.name == "run"), len(steps))
            merged = [*steps[:after], *map(plan_step_from_data, calls), *steps[after:]]
            for index, step in enumerate(merged):
                step.index = index
            del task.plan[:]
            task.plan.extend(merged)
        return admin_pb2.GetTaskResponse(task=task)

    @admin_rpc("tenant_id", "start_date", "end_date")
    async def GetTenantUsage(
        self, request: admin_pb2.GetTenantUsageRequest, context: Ctx
    ) -> admin_pb2.GetTenantUsageResponse:
        usage = await self._queries.tenant_usage(
            request.tenant_id, request.start_date, request.end_date
        )
        return tenant_usage_to_pb(usage)

    @admin_rpc("tenant_id", "agent_id")
    async def InvalidateAgent(
        self, request: admin_pb2.InvalidateAgentRequest, context: Ctx
    ) -> admin_pb2.InvalidateAgentResponse:
        await self._agents.invalidate(request.tenant_id, request.agent_id)
        return admin_pb2.InvalidateAgentResponse()

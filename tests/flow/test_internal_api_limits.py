"""The internal API (orchestrator.internal.v1.PlatformService) over a real server, both
backends: the caller's service identity, and the limits of the tenant whose job a call serves
(its in-flight cap at Query, its request rate, its daily token budget) apply to the call."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from domain.dispatch import CallContext
from domain.ids import new_id
from domain.jobs import IfBusy, NewJob, StartedJob
from domain.models import Service, WorkKind
from orchestrator.internal.v1 import platform_pb2, platform_pb2_grpc
from orchestrator.v1 import common_pb2
from tests.support.admin_calls import quota_subjects, retry_delay_ms, service_key_for
from tests.support.flow import Flow, notice
from tests.support.servers import service

TIMEOUT_S = 10.0
CAPPED = "capped"  # at most 1 job in flight per service
METERED = "metered"  # 2 requests, then one per 1000 s
FRUGAL = "frugal"  # 5 tokens a day


@pytest.fixture
def flow_settings() -> dict[str, Any]:
    return {
        "service_in_flight_overrides": f"{CAPPED}=1",
        "limit_retry_after": 0.05,
        "rate_limit_overrides": f"{METERED}=0.001:2",
        "token_budget_overrides": f"{FRUGAL}=5",
    }


def stub(flow: Flow) -> platform_pb2_grpc.PlatformServiceAsyncStub:
    return platform_pb2_grpc.PlatformServiceStub(flow.channel)


def complete_request(tenant_id: str, job_id: str, call_id: str) -> platform_pb2.CompleteRequest:
    return platform_pb2.CompleteRequest(
        tenant_id=tenant_id, job_id=job_id, call_id=call_id, prompt="pick the next tool"
    )


async def agent_run(flow: Flow, tenant_id: str = "acme") -> str:
    """A job of the tenant handed to Agent Execution (as a tool agent's message is), in
    flight; its id."""
    session_id = await flow.new_session(tenant_id)
    job = NewJob(
        job_id=new_id(),
        session_id=session_id,
        agent_id="agent-1",
        service=Service.AGENT_EXECUTION,
        kind=WorkKind.LLM_QUERY,
        content="use the tools",
        request_id="r-agent",
    )
    server = flow.running.server
    started = await server.backend.jobs.start_job(
        tenant_id, job, server.services.limits, if_busy=IfBusy.RUN
    )
    assert isinstance(started, StartedJob)
    server.services.chat.start_handoff(
        CallContext(tenant_id, "r-agent"), job, deadline_ms=started.job.deadline_ms
    )
    handed = await flow.dispatcher.next_submit()
    assert handed.job_id == job.job_id
    return job.job_id


async def answer_call(flow: Flow, tenant_id: str, tokens: tuple[int, int] = (3, 5)) -> str:
    """Play Query: complete the next child job submitted; its id."""
    work = await flow.dispatcher.next_submit()
    assert (work.tenant_id, work.kind) == (tenant_id, WorkKind.LLM_QUERY)
    prompt, completion = tokens
    reply = await flow.publish(
        [
            notice(
                work.job_id,
                1,
                "completed",
                tenant_id=tenant_id,
                result=common_pb2.JobResult(text="calculator", model="m-child"),
                usage=common_pb2.TokenUsage(
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    total_tokens=prompt + completion,
                ),
            )
        ]
    )
    assert reply.accepted == 1, reply
    return work.job_id


async def test_a_key_not_speaking_for_agent_execution_may_not_call_for_its_run(
    flow: Flow,
) -> None:
    job_id = await agent_run(flow)
    query_only = await service_key_for(flow.channel, common_pb2.SERVICE_QUERY)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub(flow).Complete(complete_request("acme", job_id, "c1"), metadata=query_only)

    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "does not speak for the agent_execution service" in (refused.value.details() or "")
    embed = platform_pb2.EmbedRequest(tenant_id="acme", job_id=job_id, call_id="e", texts=["x"])
    with pytest.raises(grpc.aio.AioRpcError) as embed_refused:
        await stub(flow).Embed(embed, metadata=query_only)
    assert embed_refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert len(flow.dispatcher.submitted) == 1  # the run only: no call started


async def test_a_key_listing_agent_execution_calls_for_its_run(flow: Flow) -> None:
    job_id = await agent_run(flow)
    agent_key = await service_key_for(flow.channel, common_pb2.SERVICE_AGENT_EXECUTION)

    pending = asyncio.ensure_future(
        stub(flow).Complete(complete_request("acme", job_id, "c1"), metadata=agent_key)
    )
    child_id = await answer_call(flow, "acme")
    reply = await asyncio.wait_for(pending, TIMEOUT_S)

    assert (reply.text, reply.call_job_id, reply.usage.total_tokens) == (
        "calculator",
        child_id,
        8,
    )


async def test_a_call_over_the_tenants_in_flight_cap_at_query_is_refused_with_retry_info(
    flow: Flow,
) -> None:
    job_id = await agent_run(flow, CAPPED)
    first = asyncio.ensure_future(
        stub(flow).Complete(complete_request(CAPPED, job_id, "c1"), metadata=service())
    )
    work = await flow.dispatcher.next_submit()  # the first call's job holds the place at Query

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub(flow).Complete(complete_request(CAPPED, job_id, "c2"), metadata=service())

    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert quota_subjects(refused.value) == [f"in_flight:{CAPPED}:query"]
    assert retry_delay_ms(refused.value) == 50
    assert len(flow.dispatcher.submitted) == 2  # the run and the first call
    await flow.publish(
        [
            notice(
                work.job_id,
                1,
                "completed",
                tenant_id=CAPPED,
                result=common_pb2.JobResult(text="done"),
                usage=common_pb2.TokenUsage(),
            )
        ]
    )
    assert (await asyncio.wait_for(first, TIMEOUT_S)).text == "done"


async def test_calls_for_a_tenants_jobs_take_from_its_request_rate(flow: Flow) -> None:
    # CreateSession takes the first of the tenant's two requests, the first call the second.
    job_id = await agent_run(flow, METERED)
    first = asyncio.ensure_future(
        stub(flow).Complete(complete_request(METERED, job_id, "c1"), metadata=service())
    )
    await answer_call(flow, METERED)
    await asyncio.wait_for(first, TIMEOUT_S)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub(flow).Complete(complete_request(METERED, job_id, "c2"), metadata=service())

    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    # The job's tenant's bucket, not the one of the service key's tenant (platform).
    assert quota_subjects(refused.value) == [f"tenant:{METERED}"]
    delay = retry_delay_ms(refused.value)
    assert delay is not None and delay > 0
    assert len(flow.dispatcher.submitted) == 2  # the run and the first call


async def test_a_call_after_the_tenants_daily_budget_is_spent_is_refused(flow: Flow) -> None:
    job_id = await agent_run(flow, FRUGAL)
    first = asyncio.ensure_future(
        stub(flow).Complete(complete_request(FRUGAL, job_id, "c1"), metadata=service())
    )
    await answer_call(flow, FRUGAL, (3, 5))  # 8 tokens: over the budget of 5
    await asyncio.wait_for(first, TIMEOUT_S)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub(flow).Complete(complete_request(FRUGAL, job_id, "c2"), metadata=service())

    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert quota_subjects(refused.value) == [f"tokens:{FRUGAL}"]
    assert len(flow.dispatcher.submitted) == 2  # the run and the first call

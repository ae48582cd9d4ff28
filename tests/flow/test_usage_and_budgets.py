"""Token usage per tenant, day and agent (recorded with each completed notice), the daily token
budget it is checked against, and the admin reads of tasks and usage; both backends."""

from __future__ import annotations

import datetime as dt
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from orchestrator.admin.v1 import admin_pb2
from orchestrator.v1 import chat_pb2, session_pb2
from tests.support.admin_calls import get_task, quota_subjects, tenant_usage
from tests.support.downstream import RecordingDispatcher
from tests.support.flow import Flow, completed, kind_of, notice, read_to_end
from tests.support.servers import running_server, tenant, test_settings

BUDGETED = "budgeted"


@pytest.fixture
def flow_settings() -> dict[str, Any]:
    return {"token_budget_overrides": f"{BUDGETED}=10"}


def today() -> str:
    return dt.datetime.now(dt.UTC).date().isoformat()


async def new_session(flow: Flow, agent_id: str, tenant_id: str = "acme") -> str:
    reply = await flow.sessions.CreateSession(
        session_pb2.CreateSessionRequest(agent_id=agent_id), metadata=tenant(tenant_id)
    )
    return str(reply.session.session_id)


async def run_job(flow: Flow, session_id: str, tenant_id: str = "acme") -> str:
    """Send a message and complete it with 3 + 5 = 8 tokens; returns the job id."""
    call, accepted = await flow.start_job(session_id, tenant_id=tenant_id)
    reply = await flow.publish([completed(accepted.job_id, 1, "done", tenant_id=tenant_id)])
    assert reply.accepted == 1
    events = await read_to_end(call)
    assert kind_of(events[-1]) == "completed"
    return str(accepted.job_id)


def metric(flow: Flow, name: str, labels: dict[str, str]) -> float:
    value = flow.running.server.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_completed_notices_add_usage_per_tenant_day_and_agent(flow: Flow) -> None:
    first = await new_session(flow, "agent-a")
    second = await new_session(flow, "agent-b")
    await run_job(flow, first)
    await run_job(flow, first)
    await run_job(flow, second)
    # A failed job reports no usage.
    call, accepted = await flow.start_job(second)
    await flow.publish([notice(accepted.job_id, 1, "failed")])
    await read_to_end(call)

    usage = await tenant_usage(flow.channel, "acme")
    assert (usage.start_date, usage.end_date) == (today(), today())
    (day,) = usage.days
    assert day.date == today()
    assert (day.usage.prompt_tokens, day.usage.completion_tokens) == (9, 15)
    assert day.usage.total_tokens == 24 and day.completed_tasks == 3
    assert [(a.agent_id, a.total_tokens) for a in day.agents] == [("agent-a", 16), ("agent-b", 8)]
    assert usage.total.total_tokens == 24 and usage.completed_tasks == 3
    assert [(a.agent_id, a.total_tokens) for a in usage.agents] == [
        ("agent-a", 16),
        ("agent-b", 8),
    ]
    assert usage.tokens_today == 24 and usage.daily_token_budget == 0
    # The session totals agree; another tenant has nothing.
    assert (await flow.get_session(first)).token_usage.total_tokens == 16
    other = await tenant_usage(flow.channel, "globex")
    assert not other.days and other.total.total_tokens == 0
    # A range without usage is empty; one that ends today includes it.
    assert not (await tenant_usage(flow.channel, "acme", "2020-01-01", "2020-01-31")).days
    week_ago = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=6)).isoformat()
    week = await tenant_usage(flow.channel, "acme", week_ago, today())
    assert [d.date for d in week.days] == [today()]
    # Metrics: every verdict counted, tokens per tenant.
    assert metric(flow, "orchestrator_tokens_total", {"tenant": "acme"}) == 24
    assert metric(flow, "orchestrator_notices_total", {"verdict": "accepted"}) == 4


async def test_rejected_notices_add_no_usage_and_are_counted(flow: Flow) -> None:
    session_id = await new_session(flow, "agent-a")
    job_id = await run_job(flow, session_id)
    reply = await flow.publish(
        [
            completed(job_id, 2, "again"),  # job finished
            completed(job_id, 1, "dup"),  # duplicate
            completed(job_id, 3, "forged", tenant_id="globex"),  # wrong tenant
        ]
    )
    assert reply.accepted == 0
    usage = await tenant_usage(flow.channel, "acme")
    assert usage.total.total_tokens == 8
    assert not (await tenant_usage(flow.channel, "globex")).days
    for verdict in ("job_finished", "duplicate", "wrong_tenant"):
        assert metric(flow, "orchestrator_notices_total", {"verdict": verdict}) == 1


async def test_a_tenant_at_its_daily_budget_cannot_start_work(flow: Flow) -> None:
    session_id = await new_session(flow, "agent-a", BUDGETED)
    await run_job(flow, session_id, BUDGETED)  # 8 of 10: still under
    await run_job(flow, session_id, BUDGETED)  # 16 of 10: over
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await read_to_end(flow.send(session_id, tenant_id=BUDGETED))
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert quota_subjects(refused.value) == [f"tokens:{BUDGETED}"]
    assert "budget" in (refused.value.details() or "")
    # Nothing was recorded or dispatched for the refused message.
    session = await flow.get_session(session_id, BUDGETED)
    assert session.message_count == 4 and session.state == session_pb2.SESSION_STATE_ACTIVE
    assert len(flow.dispatcher.submitted) == 2
    usage = await tenant_usage(flow.channel, BUDGETED)
    assert (usage.daily_token_budget, usage.tokens_today) == (10, 16)
    # Other tenants (no budget) are not affected.
    other = await new_session(flow, "agent-a")
    await run_job(flow, other)


async def test_get_task_reads_any_tenants_task_by_id(flow: Flow) -> None:
    session_id = await new_session(flow, "agent-a")
    call = flow.chat.SendMessage(
        chat_pb2.SendMessageRequest(session_id=session_id, content="hi", model="m-7"),
        metadata=tenant("acme", **{"x-request-id": "req-get-task-1"}),
        timeout=10,
    )
    first: Any = await call.read()
    accepted = first.event
    await flow.dispatcher.next_submit()
    task = await get_task(flow.channel, "acme", accepted.job_id)
    assert task.state in (admin_pb2.TASK_STATE_PENDING, admin_pb2.TASK_STATE_RUNNING)
    assert (task.tenant_id, task.session_id, task.agent_id) == ("acme", session_id, "agent-a")
    assert (task.request_id, task.model) == ("req-get-task-1", "m-7")
    assert task.create_time.ToMilliseconds() > 0
    assert task.deadline_time.ToMilliseconds() > task.create_time.ToMilliseconds()
    await flow.publish([completed(accepted.job_id, 1, "ok")])
    await read_to_end(call)
    task = await get_task(flow.channel, "acme", accepted.job_id)
    assert task.state == admin_pb2.TASK_STATE_COMPLETED
    assert task.usage.total_tokens == 8 and task.last_notice_sequence == 1
    # Under another tenant the task does not exist; a malformed id is INVALID_ARGUMENT.
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await get_task(flow.channel, "globex", accepted.job_id)
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await get_task(flow.channel, "acme", "nope")
    assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("start", "end"),
    [("2026-13-01", ""), ("2026-02-01", "2026-01-01"), ("2020-01-01", "2022-01-01")],
)
async def test_usage_ranges_are_validated(flow: Flow, start: str, end: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await tenant_usage(flow.channel, "acme", start, end)
    assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_redis_usage_hash_is_per_tenant_day_with_a_long_ttl(
    redis_url: str, redis_client: Redis
) -> None:
    dispatcher = RecordingDispatcher()
    async with running_server(test_settings(redis_url), dispatcher=dispatcher) as running:
        flow = Flow(running, dispatcher)
        await run_job(flow, await new_session(flow, "agent-a"))
    day = dt.datetime.now(dt.UTC).date() - dt.date(1970, 1, 1)
    key = f"ao:{{t:acme}}:usage:{day.days}"
    fields = await redis_client.hgetall(key)
    assert fields == {
        "total": "8",
        "prompt": "3",
        "completion": "5",
        "jobs": "1",
        "agent:agent-a": "8",
    }
    assert 399 * 86400 < await redis_client.ttl(key) <= 400 * 86400

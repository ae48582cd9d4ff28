"""The reference Agent Management and Tool Registry over real gRPC: demo agents per demo tenant,
changes reported as AGENT_CHANGED, tool definitions, tenant isolation and bounds."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from agents.v1 import agents_pb2
from orchestrator.v1 import common_pb2, task_update_pb2
from reference.agents import AgentSpec
from tests.reference.conftest import Stack, refused
from tools.v1 import tools_pb2

AGENT_CHANGED = task_update_pb2.NOTICE_EVENT_AGENT_CHANGED


async def get(stack: Stack, tenant: str, agent: str) -> agents_pb2.Agent:
    request = agents_pb2.GetAgentRequest(tenant_id=tenant, agent_id=agent)
    return (await stack.agents.GetAgent(request, timeout=5)).agent


@pytest.mark.parametrize("tenant", ["demo", "other"])
async def test_each_demo_tenant_has_one_agent_of_each_kind(stack: Stack, tenant: str) -> None:
    support = await get(stack, tenant, "support-bot")
    assert support.tenant_id == tenant
    assert support.kind == agents_pb2.AGENT_KIND_LLM
    assert support.version == 1
    assert support.system_prompt

    tool_bot = await get(stack, tenant, "tool-bot")
    assert tool_bot.kind == agents_pb2.AGENT_KIND_TOOL_AGENT
    assert list(tool_bot.tool_names) == ["calculator", "clock"]
    assert tool_bot.limits.max_tool_calls == 4

    flow = await get(stack, tenant, "research-flow")
    assert flow.kind == agents_pb2.AGENT_KIND_WORKFLOW
    assert flow.workflow_id == "research-flow"


async def test_unknown_agents_and_tenants_are_not_found(stack: Stack) -> None:
    for tenant, agent in (("demo", "nope"), ("acme", "support-bot")):
        request = agents_pb2.GetAgentRequest(tenant_id=tenant, agent_id=agent)
        await refused(
            stack.agents.GetAgent(request, timeout=5), grpc.StatusCode.NOT_FOUND, "agent_id"
        )


@pytest.mark.parametrize("overrides", [{"demo_tenants": ("acme",)}])
async def test_demo_tenants_follow_the_setting(stack: Stack) -> None:
    assert (await get(stack, "acme", "tool-bot")).tenant_id == "acme"
    request = agents_pb2.GetAgentRequest(tenant_id="demo", agent_id="tool-bot")
    await refused(stack.agents.GetAgent(request, timeout=5), grpc.StatusCode.NOT_FOUND, "agent_id")


async def test_update_bumps_the_version_and_reports_agent_changed(stack: Stack) -> None:
    book = stack.reference.agents
    updated = book.update_agent("demo", "support-bot", system_prompt="Be brief.")
    assert updated.version == 2
    agent = await get(stack, "demo", "support-bot")
    assert (agent.version, agent.system_prompt) == (2, "Be brief.")
    # The other tenant's agent of the same id is untouched.
    assert (await get(stack, "other", "support-bot")).version == 1

    recorder = stack.orchestrator.recorder
    await recorder.wait_until(lambda: any(n.event == AGENT_CHANGED for n in recorder.notices))
    (notice,) = [n for n in recorder.notices if n.event == AGENT_CHANGED]
    assert notice.service == common_pb2.SERVICE_AGENT_MANAGEMENT
    assert (notice.tenant_id, notice.agent_id, notice.job_id) == ("demo", "support-bot", "")
    assert notice.sequence == 2


async def test_put_and_remove_report_too(stack: Stack) -> None:
    book = stack.reference.agents
    created = book.put_agent(AgentSpec("acme", "calc", "tool_agent", tool_names=("calculator",)))
    assert created.version == 1
    replaced = book.put_agent(AgentSpec("acme", "calc", "llm"))
    assert replaced.version == 2
    assert (await get(stack, "acme", "calc")).kind == agents_pb2.AGENT_KIND_LLM
    assert book.remove_agent("acme", "calc") is True
    assert book.remove_agent("acme", "calc") is False
    again = book.put_agent(AgentSpec("acme", "calc", "llm"))
    assert again.version == 4  # after the removal's 3
    assert book.remove_agent("acme", "calc") is True
    request = agents_pb2.GetAgentRequest(tenant_id="acme", agent_id="calc")
    await refused(stack.agents.GetAgent(request, timeout=5), grpc.StatusCode.NOT_FOUND, "agent_id")

    recorder = stack.orchestrator.recorder
    await recorder.wait_until(
        lambda: len([n for n in recorder.notices if n.event == AGENT_CHANGED]) == 5
    )
    changes = [(n.tenant_id, n.agent_id, n.sequence) for n in recorder.notices]
    assert changes == [("acme", "calc", version) for version in (1, 2, 3, 4, 5)]


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"kind": "robot"}, "kind must be one of"),
        ({"tool_names": ("shell",)}, "unknown tool"),
        ({"tool_names": ()}, "needs tool_names"),
        ({"max_tool_calls": -1}, "must not be negative"),
        ({"version": 9}, "cannot be changed"),
        ({"agent_id": "x"}, "cannot be changed"),
    ],
)
async def test_bad_updates_change_nothing(
    stack: Stack, changes: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        stack.reference.agents.update_agent("demo", "tool-bot", **changes)
    assert (await get(stack, "demo", "tool-bot")).version == 1
    with pytest.raises(KeyError):
        stack.reference.agents.update_agent("demo", "nope", model="m")
    with pytest.raises(ValueError, match="unknown workflow_id"):
        stack.reference.agents.put_agent(AgentSpec("demo", "w", "workflow", workflow_id="x"))
    assert stack.reference.reporter.unanswered == 0
    assert stack.orchestrator.recorder.notices == []


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"agent_id": "support-bot"}, "tenant_id"),
        ({"tenant_id": "demo"}, "agent_id"),
        ({"tenant_id": "demo", "agent_id": "a" * 1025}, "agent_id"),
        ({"tenant_id": "d" * 1025, "agent_id": "support-bot"}, "tenant_id"),
    ],
)
async def test_get_agent_bounds(stack: Stack, request_fields: dict[str, str], field: str) -> None:
    request = agents_pb2.GetAgentRequest(**request_fields)
    await refused(
        stack.agents.GetAgent(request, timeout=5), grpc.StatusCode.INVALID_ARGUMENT, field
    )


async def test_tools_resolve_in_request_order(stack: Stack) -> None:
    request = tools_pb2.ResolveToolsRequest(tenant_id="demo", names=["clock", "calculator"])
    reply = await stack.tools.ResolveTools(request, timeout=5)
    assert [t.name for t in reply.tools] == ["clock", "calculator"]
    calculator = json.loads(reply.tools[1].parameters_json_schema)
    assert calculator["required"] == ["expression"]
    assert all(t.description for t in reply.tools)


async def test_unknown_tools_are_not_found_naming_the_first(stack: Stack) -> None:
    request = tools_pb2.ResolveToolsRequest(tenant_id="demo", names=["clock", "shell", "rm"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.tools.ResolveTools(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "names: no tool 'shell'"


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"names": ["clock"]}, "tenant_id"),
        ({"tenant_id": "demo"}, "names"),
        ({"tenant_id": "demo", "names": ["clock"] * 65}, "names"),
        ({"tenant_id": "demo", "names": ["clock", ""]}, "names[1]"),
        ({"tenant_id": "demo", "names": ["c" * 129]}, "names[0]"),
    ],
)
async def test_resolve_tools_bounds(
    stack: Stack, request_fields: dict[str, Any], field: str
) -> None:
    request = tools_pb2.ResolveToolsRequest(**request_fields)
    await refused(
        stack.tools.ResolveTools(request, timeout=5), grpc.StatusCode.INVALID_ARGUMENT, field
    )

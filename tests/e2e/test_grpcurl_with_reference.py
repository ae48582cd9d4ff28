"""`make run` as a user drives it with grpcurl: the service with the embedded reference
services, a background chat message and a batch whose results stream to the end."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.test_grpcurl import GRPCURL, call
from tests.support.processes import ServerProcess, make_run_server
from tests.support.redis_process import free_port

# Where the embedded reference services listen: the Query address, a free port here.
REFERENCE = f"127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`orchestrator serve` configured as `make run` does it (reference services embedded)."""
    server = make_run_server(
        tmp_path_factory.mktemp("serve-ref") / "server.log",
        ORCH_QUERY_SERVICE_ADDRESS=REFERENCE,
        ORCH_EMBEDDING_SERVICE_ADDRESS=REFERENCE,
    )
    server.start()
    yield server
    server.kill()


def messages(stdout: str) -> list[dict[str, Any]]:
    """grpcurl prints each streamed message as one JSON document."""
    decoder, at = json.JSONDecoder(), 0
    found: list[dict[str, Any]] = []
    text = stdout.strip()
    while at < len(text):
        value, end = decoder.raw_decode(text, at)
        found.append(value)
        at = end
        while at < len(text) and text[at].isspace():
            at += 1
    return found


def test_a_background_message_is_queued_then_completed(served: ServerProcess) -> None:
    created = call(served, "SessionService/CreateSession", {"agent_id": "support-bot"})
    assert created.returncode == 0, created.stderr
    session_id = json.loads(created.stdout)["session"]["session_id"]
    sent = call(
        served,
        "ChatService/SendMessage",
        {
            "session_id": session_id,
            "content": "Summarise",
            "background": True,
            "priority": "PRIORITY_LOW",
        },
    )
    assert sent.returncode == 0, sent.stderr
    events = [m["event"] for m in messages(sent.stdout)]
    assert events[0]["accepted"]["queued"] is True
    assert "completed" in events[-1]


def test_a_batch_submitted_with_grpcurl_streams_its_results(served: ServerProcess) -> None:
    items = [
        {"custom_id": "q1", "kind": "BATCH_ITEM_KIND_LLM_QUERY", "content": "What is RAG?"},
        {"custom_id": "e1", "kind": "BATCH_ITEM_KIND_EMBEDDING", "content": "embed me"},
    ]
    submitted = call(served, "BatchService/SubmitBatch", {"items": items})
    assert submitted.returncode == 0, submitted.stderr
    batch_id = json.loads(submitted.stdout)["batch"]["batch_id"]
    streamed = call(served, "BatchService/StreamBatchResults", {"batch_id": batch_id})
    assert streamed.returncode == 0, streamed.stderr
    results = [m["result"] for m in messages(streamed.stdout)]
    assert sorted(r["custom_id"] for r in results) == ["e1", "q1"]
    assert all(r["state"] == "BATCH_ITEM_STATE_COMPLETED" for r in results), results


def reference(method: str, body: dict[str, object]) -> dict[str, Any]:
    """grpcurl straight to the embedded reference services, as the README shows."""
    done = subprocess.run(
        [GRPCURL, "-plaintext", "-d", json.dumps(body), REFERENCE, method],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    reply: dict[str, Any] = json.loads(done.stdout)
    return reply


def test_the_embedded_platform_services_answer_as_the_readme_shows(served: ServerProcess) -> None:
    listed = subprocess.run(
        [GRPCURL, "-plaintext", REFERENCE, "list"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    for service in (
        "conversation.v1.ConversationService",
        "agents.v1.AgentManagementService",
        "tools.v1.ToolRegistryService",
        "agent_execution.v1.AgentExecutionService",
        "workflow.v1.WorkflowEngineService",
    ):
        assert service in listed.stdout.split()
    agent = reference(
        "agents.v1.AgentManagementService/GetAgent", {"tenant_id": "demo", "agent_id": "tool-bot"}
    )["agent"]
    assert (agent["kind"], agent["tool_names"]) == (
        "AGENT_KIND_TOOL_AGENT",
        ["calculator", "clock"],
    )
    resolved = reference(
        "tools.v1.ToolRegistryService/ResolveTools",
        {"tenant_id": "demo", "names": ["calculator", "clock"]},
    )
    assert [tool["name"] for tool in resolved["tools"]] == ["calculator", "clock"]

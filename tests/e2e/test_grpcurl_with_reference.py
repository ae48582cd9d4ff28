"""`make run` as a user drives it with grpcurl: the service with the embedded reference
services, a background chat message and a batch whose results stream to the end."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.test_grpcurl import call
from tests.support.processes import ServerProcess


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`orchestrator serve` configured as `make run` does it (reference services embedded)."""
    server = ServerProcess(
        tmp_path_factory.mktemp("serve-ref") / "server.log", ORCH_EMBEDDED_REFERENCE="true"
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

"""/ws/task_updates: the seed's JSON notices feed the same path as PublishUpdates."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from google.protobuf import json_format

from tests.support.flow import Flow, kind_of, read_to_end
from tests.support.servers import tenant

UNKNOWN_JOB = "0190a0b0-0000-7000-8000-000000000001"


def _headers(metadata: Any) -> dict[str, str]:
    return {key: value for key, value in metadata}


async def test_a_seed_notice_completes_the_job(
    flow: Flow, ws: aiohttp.ClientWebSocketResponse
) -> None:
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    await ws.send_json(
        {
            "event": "job_completed",
            "service": "query",
            "job_id": accepted.job_id,
            "tenant_id": "acme",
            "agent_id": "agent-1",
            "result": {"text": "from the socket", "sources": ["doc-1"]},
        }
    )
    verdict = await ws.receive_json(timeout=5)
    assert verdict["verdict"] == "accepted" and verdict["job_id"] == accepted.job_id
    (done,) = await read_to_end(call)
    assert kind_of(done) == "completed"
    assert done.completed.result.text == "from the socket"
    assert json_format.MessageToDict(done.completed.result.data) == {"sources": ["doc-1"]}


async def test_malformed_json_is_answered_and_the_socket_stays_open(
    flow: Flow, ws: aiohttp.ClientWebSocketResponse
) -> None:
    await ws.send_str("{not json")
    reply = await ws.receive_json(timeout=5)
    assert reply["error"] == "malformed_json"
    await ws.send_json({"event": "job_completed", "service": "query", "tenant_id": "acme"})
    reply = await ws.receive_json(timeout=5)
    assert reply["verdict"] == "malformed" and "job_id" in reply["detail"]
    await ws.send_json(["not", "an", "object"])
    assert (await ws.receive_json(timeout=5))["verdict"] == "malformed"
    await ws.send_json(
        {"event": "job_completed", "service": "query", "job_id": UNKNOWN_JOB, "tenant_id": "a"}
    )
    assert (await ws.receive_json(timeout=5))["verdict"] == "unknown_job"


async def test_wrong_tenant_and_wrong_service_are_rejected(
    flow: Flow, ws: aiohttp.ClientWebSocketResponse
) -> None:
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    base = {"event": "job_completed", "job_id": accepted.job_id, "result": {"text": "x"}}
    await ws.send_json({**base, "service": "query", "tenant_id": "globex"})
    assert (await ws.receive_json(timeout=5))["verdict"] == "wrong_tenant"
    await ws.send_json({**base, "service": "embedding", "tenant_id": "acme"})
    assert (await ws.receive_json(timeout=5))["verdict"] == "wrong_service"
    await ws.send_json({**base, "service": "query", "tenant_id": "acme"})
    assert (await ws.receive_json(timeout=5))["verdict"] == "accepted"
    await ws.send_json({**base, "service": "query", "tenant_id": "acme"})
    assert (await ws.receive_json(timeout=5))["verdict"] == "job_finished"
    await read_to_end(call)


async def test_a_client_key_cannot_open_the_socket(flow: Flow) -> None:
    url = f"http://127.0.0.1:{flow.running.server.ws_bridge.port}/ws/task_updates"
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as error:
            await http.ws_connect(url, headers=_headers(tenant("acme")))
        assert error.value.status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as error:
            await http.ws_connect(url)
        assert error.value.status == 401

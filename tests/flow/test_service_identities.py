"""Service identities over real gRPC, on both backends: a service key names the services it speaks
for; a notice for any other service is wrong_service, whatever the job. Keys with no list
(legacy) speak for every service."""

from __future__ import annotations

from collections.abc import Sequence

import aiohttp
import grpc
import pytest

from orchestrator.admin.v1 import admin_pb2, admin_pb2_grpc
from orchestrator.v1 import common_pb2, task_update_pb2
from tests.support.admin_calls import create_service_key, service_key_for
from tests.support.flow import Flow, completed, kind_of, notice, read_to_end
from tests.support.servers import admin

QUERY = common_pb2.SERVICE_QUERY
EMBEDDING = common_pb2.SERVICE_EMBEDDING
AGENT_MANAGEMENT = common_pb2.SERVICE_AGENT_MANAGEMENT
SERVICE_ROLE = admin_pb2.API_KEY_ROLE_SERVICE
UNKNOWN_JOB = "0190a0b0-0000-7000-8000-000000000001"


async def create_key(
    flow: Flow, services: Sequence[int], role: int = SERVICE_ROLE
) -> admin_pb2.CreateApiKeyResponse:
    return await create_service_key(flow.channel, services, role)


async def service_key(flow: Flow, *services: int) -> tuple[tuple[str, str]]:
    return await service_key_for(flow.channel, *services)


async def test_a_key_reporting_for_a_service_it_does_not_speak_for_gets_wrong_service(
    flow: Flow,
) -> None:
    embedding_only = await service_key(flow, EMBEDDING)
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)  # a query job
    reply = await flow.publish([completed(accepted.job_id, 1, "forged")], embedding_only)
    assert (reply.received, reply.rejected_wrong_service, reply.accepted) == (1, 1, 0)
    (rejected,) = reply.rejected
    assert rejected.reason == task_update_pb2.REJECT_REASON_WRONG_SERVICE
    assert "does not speak for query" in rejected.detail
    # The job is untouched: the right key still completes it.
    query_key = await service_key(flow, QUERY)
    assert (await flow.publish([completed(accepted.job_id, 1, "real")], query_key)).accepted == 1
    (done,) = await read_to_end(call)
    assert done.completed.result.text == "real"


async def test_the_verdict_does_not_reveal_whether_the_job_exists(flow: Flow) -> None:
    embedding_only = await service_key(flow, EMBEDDING)
    reply = await flow.publish([notice(UNKNOWN_JOB, 1, "progress")], embedding_only)
    assert reply.rejected_wrong_service == 1 and reply.rejected_unknown_job == 0


async def test_a_key_listing_the_jobs_service_reports_for_it(flow: Flow) -> None:
    query_and_embedding = await service_key(flow, QUERY, EMBEDDING)
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    reply = await flow.publish([completed(accepted.job_id, 1, "fine")], query_and_embedding)
    assert reply.accepted == 1
    assert [kind_of(e) for e in await read_to_end(call)] == ["completed"]


async def test_a_legacy_key_without_a_list_still_speaks_for_every_service(flow: Flow) -> None:
    legacy = await service_key(flow)
    session_id = await flow.new_session()
    call, accepted = await flow.start_job(session_id)
    assert (await flow.publish([completed(accepted.job_id, 1, "ok")], legacy)).accepted == 1
    assert [kind_of(e) for e in await read_to_end(call)] == ["completed"]


async def test_agent_changed_needs_a_key_that_speaks_for_agent_management(flow: Flow) -> None:
    change = task_update_pb2.PublishUpdatesRequest(
        event=task_update_pb2.NOTICE_EVENT_AGENT_CHANGED,
        service=AGENT_MANAGEMENT,
        tenant_id="acme",
        agent_id="agent-1",
    )
    refused = await flow.publish([change], await service_key(flow, QUERY))
    assert refused.rejected_wrong_service == 1
    assert "does not speak for agent_management" in refused.rejected[0].detail
    allowed = await flow.publish([change], await service_key(flow, AGENT_MANAGEMENT))
    assert allowed.accepted == 1


async def test_the_websocket_bridge_applies_the_same_identity(flow: Flow) -> None:
    embedding_only = dict(await service_key(flow, EMBEDDING))
    session_id = await flow.new_session()
    _, accepted = await flow.start_job(session_id)
    url = f"http://127.0.0.1:{flow.running.server.ws_bridge.port}/ws/task_updates"
    async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=embedding_only) as ws:
        await ws.send_json(
            {
                "event": "job_completed",
                "service": "query",
                "job_id": accepted.job_id,
                "tenant_id": "acme",
                "result": {"text": "forged"},
            }
        )
        verdict = await ws.receive_json(timeout=5)
    assert verdict["verdict"] == "wrong_service"


async def test_created_and_listed_keys_show_their_services(flow: Flow) -> None:
    created = await create_key(flow, [EMBEDDING, QUERY])
    assert list(created.key.services) == [QUERY, EMBEDDING]  # enum order
    stub = admin_pb2_grpc.AdminServiceStub(flow.channel)
    listed = await stub.ListApiKeys(
        admin_pb2.ListApiKeysRequest(tenant_id="platform"), metadata=admin()
    )
    (key,) = [k for k in listed.keys if k.key_id == created.key_id]
    assert list(key.services) == [QUERY, EMBEDDING]


@pytest.mark.parametrize(
    ("services", "role", "field"),
    [
        ([QUERY], admin_pb2.API_KEY_ROLE_CLIENT, "services"),
        ([QUERY], admin_pb2.API_KEY_ROLE_ADMIN, "services"),
        ([common_pb2.SERVICE_UNSPECIFIED], SERVICE_ROLE, "services[0]"),
        ([QUERY, 99], SERVICE_ROLE, "services[1]"),
        ([QUERY, EMBEDDING, QUERY], SERVICE_ROLE, "services[2]"),
        ([QUERY] * 17, SERVICE_ROLE, "services"),
    ],
    ids=["client", "admin", "unspecified", "unknown", "repeated", "too-many"],
)
async def test_create_api_key_refuses_bad_services_naming_the_field(
    flow: Flow, services: list[int], role: int, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await create_key(flow, services, role)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (error.value.details() or "")

"""Tenant isolation over real servers (both backends): every Session, Chat, TaskUpdate and Admin
RPC called with another tenant's session and job ids, and with every wrong role, is NOT_FOUND or
PERMISSION_DENIED, leaks nothing of the victim's data, and changes nothing: the victim's session,
its events and its job are the same afterwards and nothing reached the downstream service.
(BatchService is built elsewhere and not covered here yet.)"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from orchestrator.admin.v1 import admin_pb2
from orchestrator.v1 import chat_pb2, session_pb2
from tests.support.admin_calls import admin_stub, get_task
from tests.support.downstream import RecordingDispatcher
from tests.support.flow import Flow, completed, read_events, read_to_end
from tests.support.servers import admin, running_server, service, tenant, test_settings

VICTIM = "acme"
ATTACKER = "globex"
SECRET_AGENT = "victim-secret-agent"
SECRET_CONTENT = "victim secret content"
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DENIED = grpc.StatusCode.PERMISSION_DENIED


@dataclass
class Scene:
    flow: Flow
    session_id: str  # the victim's, with one job in flight
    job_id: str
    done_job_id: str  # a finished job of the victim
    attacker_session_id: str


@pytest.fixture
async def scene(backend_url: str | None) -> AsyncIterator[Scene]:
    dispatcher = RecordingDispatcher()
    async with running_server(test_settings(backend_url), dispatcher=dispatcher) as running:
        flow = Flow(running, dispatcher)
        created = await flow.sessions.CreateSession(
            session_pb2.CreateSessionRequest(agent_id=SECRET_AGENT, metadata={"k": "secret"}),
            metadata=tenant(VICTIM),
        )
        session_id = created.session.session_id
        call, done = await flow.start_job(session_id)
        await flow.publish([completed(done.job_id, 1, "secret answer")])
        await read_to_end(call)
        in_flight = flow.send(session_id, SECRET_CONTENT)
        accepted = (await in_flight.read()).event
        await dispatcher.next_submit()
        attacker = await flow.new_session(ATTACKER)
        yield Scene(flow, session_id, accepted.job_id, done.job_id, attacker)
        in_flight.cancel()


Call = Callable[[Scene, Any], Awaitable[Any]]


async def _stream(call: Any) -> None:
    await read_to_end(call)


def _session_calls() -> dict[str, Call]:
    return {
        "GetSession": lambda s, md: s.flow.sessions.GetSession(
            session_pb2.GetSessionRequest(session_id=s.session_id), metadata=md
        ),
        "CloseSession": lambda s, md: s.flow.sessions.CloseSession(
            session_pb2.CloseSessionRequest(session_id=s.session_id), metadata=md
        ),
        "ListSessions": lambda s, md: s.flow.sessions.ListSessions(
            session_pb2.ListSessionsRequest(page_size=100), metadata=md
        ),
        "CreateSession": lambda s, md: s.flow.sessions.CreateSession(
            session_pb2.CreateSessionRequest(agent_id="x"), metadata=md
        ),
    }


def _chat_calls() -> dict[str, Call]:
    return {
        "SendMessage": lambda s, md: _stream(
            s.flow.chat.SendMessage(
                chat_pb2.SendMessageRequest(session_id=s.session_id, content="hi"),
                metadata=md,
                timeout=10,
            )
        ),
        "StreamSession": lambda s, md: _stream(
            s.flow.chat.StreamSession(
                chat_pb2.StreamSessionRequest(session_id=s.session_id), metadata=md, timeout=10
            )
        ),
        "CancelJob": lambda s, md: s.flow.chat.CancelJob(
            chat_pb2.CancelJobRequest(session_id=s.session_id, job_id=s.job_id), metadata=md
        ),
    }


def _task_update_calls() -> dict[str, Call]:
    return {
        "PublishUpdates": lambda s, md: s.flow.publish(
            [completed(s.job_id, 1, "forged", tenant_id=VICTIM)], metadata=md
        ),
    }


def _admin_calls() -> dict[str, Call]:
    return {
        "CreateApiKey": lambda s, md: admin_stub(s.flow.channel).CreateApiKey(
            admin_pb2.CreateApiKeyRequest(
                tenant_id=VICTIM, role=admin_pb2.API_KEY_ROLE_ADMIN, description="x"
            ),
            metadata=md,
        ),
        "ListApiKeys": lambda s, md: admin_stub(s.flow.channel).ListApiKeys(
            admin_pb2.ListApiKeysRequest(tenant_id=VICTIM), metadata=md
        ),
        "RevokeApiKey": lambda s, md: admin_stub(s.flow.channel).RevokeApiKey(
            admin_pb2.RevokeApiKeyRequest(key_id="anykey01"), metadata=md
        ),
        "GetTask": lambda s, md: admin_stub(s.flow.channel).GetTask(
            admin_pb2.GetTaskRequest(tenant_id=VICTIM, job_id=s.job_id), metadata=md
        ),
        "GetTenantUsage": lambda s, md: admin_stub(s.flow.channel).GetTenantUsage(
            admin_pb2.GetTenantUsageRequest(tenant_id=VICTIM), metadata=md
        ),
    }


# Every (role, family) pair that is not allowed: client keys only reach Session and Chat,
# service keys only TaskUpdate, admin keys only Admin. The keys belong to the victim's tenant,
# so only the role stands in the way.
_ROLES = {"client": tenant(VICTIM), "service": service(VICTIM), "admin": admin(VICTIM)}
_FAMILIES = {
    "session": (_session_calls(), "client"),
    "chat": (_chat_calls(), "client"),
    "task_update": (_task_update_calls(), "service"),
    "admin": (_admin_calls(), "admin"),
}
WRONG_ROLE_CASES = [
    pytest.param(role, name, call, id=f"{role}-key-on-{name}")
    for family, (calls, allowed) in _FAMILIES.items()
    for name, call in calls.items()
    for role in _ROLES
    if role != allowed
]


async def snapshot(scene: Scene) -> tuple[Any, ...]:
    """What must not change: the victim's session (minus its sliding expiry), its events, both
    jobs, and what the downstream service was asked."""
    flow = scene.flow
    session = await flow.get_session(scene.session_id, VICTIM)
    session.ClearField("expire_time")
    session.ClearField("update_time")
    follow = flow.follow(scene.session_id, tenant_id=VICTIM)
    events = await read_events(follow, 3)
    follow.cancel()
    jobs = [await get_task(flow.channel, VICTIM, j) for j in (scene.job_id, scene.done_job_id)]
    dispatched = (len(flow.dispatcher.submitted), list(flow.dispatcher.cancelled))
    return session, [e.SerializeToString() for e in events], jobs, dispatched


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    assert SECRET_AGENT not in (error.value.details() or "")
    assert SECRET_CONTENT not in (error.value.details() or "")
    return error.value


@pytest.mark.parametrize(("role", "name", "call"), WRONG_ROLE_CASES)
async def test_a_wrong_role_is_permission_denied_and_changes_nothing(
    scene: Scene, role: str, name: str, call: Call
) -> None:
    before = await snapshot(scene)
    error = await refused(call(scene, _ROLES[role]))
    assert error.code() is DENIED, (name, role, error.details())
    assert await snapshot(scene) == before


def _cross_tenant_calls() -> dict[str, Call]:
    """Calls by the attacker's client (or, for admin reads, an admin naming the attacker's
    tenant) that name the victim's session or job ids."""
    other = {
        "CancelJob-own-session": lambda s, md: s.flow.chat.CancelJob(
            chat_pb2.CancelJobRequest(session_id=s.attacker_session_id, job_id=s.job_id),
            metadata=md,
        ),
        "SendMessage-busy-reject": lambda s, md: _stream(
            s.flow.chat.SendMessage(
                chat_pb2.SendMessageRequest(
                    session_id=s.session_id,
                    content="hi",
                    busy_policy=chat_pb2.BUSY_POLICY_REJECT,
                ),
                metadata=md,
                timeout=10,
            )
        ),
        "StreamSession-after": lambda s, md: _stream(
            s.flow.chat.StreamSession(
                chat_pb2.StreamSessionRequest(session_id=s.session_id, after_sequence=1),
                metadata=md,
                timeout=10,
            )
        ),
    }
    calls = {**_session_calls(), **_chat_calls(), **other}
    del calls["ListSessions"], calls["CreateSession"]  # take no ids; checked separately
    return calls


@pytest.mark.parametrize(("name", "call"), list(_cross_tenant_calls().items()))
async def test_another_tenants_ids_are_not_found_and_change_nothing(
    scene: Scene, name: str, call: Call
) -> None:
    before = await snapshot(scene)
    error = await refused(call(scene, tenant(ATTACKER)))
    assert error.code() is NOT_FOUND, (name, error.details())
    assert await snapshot(scene) == before


async def test_admin_reads_are_scoped_to_the_named_tenant(scene: Scene) -> None:
    before = await snapshot(scene)
    for job_id in (scene.job_id, scene.done_job_id):
        error = await refused(get_task(scene.flow.channel, ATTACKER, job_id))
        assert error.code() is NOT_FOUND
    usage = await admin_stub(scene.flow.channel).GetTenantUsage(
        admin_pb2.GetTenantUsageRequest(tenant_id=ATTACKER), metadata=admin()
    )
    assert not usage.days and usage.total.total_tokens == 0
    assert await snapshot(scene) == before


async def test_listing_and_notices_never_reach_another_tenant(scene: Scene) -> None:
    before = await snapshot(scene)
    listed = await scene.flow.sessions.ListSessions(
        session_pb2.ListSessionsRequest(page_size=1000), metadata=tenant(ATTACKER)
    )
    assert [s.session_id for s in listed.sessions] == [scene.attacker_session_id]
    # A notice that names the victim's job under the attacker's tenant is rejected.
    reply = await scene.flow.publish([completed(scene.job_id, 1, "forged", tenant_id=ATTACKER)])
    assert (reply.accepted, reply.rejected_wrong_tenant) == (0, 1)
    assert await snapshot(scene) == before

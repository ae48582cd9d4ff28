"""A plan survives the process that runs it: a real `orchestrator serve` process (ORCH_PLANS on,
Redis) is killed with SIGKILL while a call of a chat's plan hangs, and another server on the
same Redis resumes the plan at the first call that had not finished. Killed in the history
pre-step, the work is handed over once, by the survivor; killed after Conversation stored the
turns but before the victim heard back, the survivor appends again under the same job id
(stored once) and completes the job."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator.admin.v1 import admin_pb2, admin_pb2_grpc
from orchestrator.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    task_update_pb2_grpc,
)
from tests.support.flow import TIMEOUT_S, Event, completed, kind_of
from tests.support.platform_grpc import PlatformServer
from tests.support.processes import ServerProcess
from tests.support.servers import admin, bearer, running_server, test_settings

TENANT = "acme"


async def create_key(channel: grpc.aio.Channel, role: Any) -> tuple[tuple[str, str]]:
    created = await admin_pb2_grpc.AdminServiceStub(channel).CreateApiKey(
        admin_pb2.CreateApiKeyRequest(tenant_id=TENANT, role=role, description="test"),
        metadata=admin(),
    )
    return (bearer(created.api_key),)


async def final_event(channel: grpc.aio.Channel, session_id: str, metadata: Any) -> Event:
    follower: Any = chat_pb2_grpc.ChatServiceStub(channel).StreamSession(
        chat_pb2.StreamSessionRequest(session_id=session_id), metadata=metadata
    )

    async def final() -> Event:
        async for message in follower:
            if kind_of(message.event) in ("completed", "failed", "timed_out", "cancelled"):
                event: Event = message.event
                return event
        raise AssertionError("the session's stream ended before a final event")

    try:
        return await asyncio.wait_for(final(), TIMEOUT_S)
    finally:
        follower.cancel()


@pytest.mark.parametrize("hang", ["load_history", "append_history"])
async def test_a_plan_killed_mid_call_is_resumed_by_another_process(
    redis_url: str, tmp_path: Path, hang: str
) -> None:
    platform = PlatformServer(TENANT)
    await platform.start()
    state = platform.state
    hold = state.hold_history if hang == "load_history" else state.hold_append_answer
    hold.active = True
    settings = test_settings(
        redis_url,
        plans=True,
        query_service_address=platform.address,
        embedding_service_address=platform.address,
        handoff_grace=0.5,
    )
    victim = ServerProcess(
        tmp_path / "victim.log",
        REDIS_URL=redis_url,
        ORCH_PLANS="true",
        ORCH_QUERY_SERVICE_ADDRESS=platform.address,
        ORCH_EMBEDDING_SERVICE_ADDRESS=platform.address,
        ORCH_DOWNSTREAM_TIMEOUT="60",  # it waits for the held call until it is killed
        ORCH_HANDOFF_GRACE="0.5",
        ORCH_BATCH_WORKER_ENABLED="false",
    )
    try:
        async with running_server(settings) as survivor:
            await asyncio.to_thread(victim.start)
            client = await create_key(survivor.channel, admin_pb2.API_KEY_ROLE_CLIENT)
            reporter = await create_key(survivor.channel, admin_pb2.API_KEY_ROLE_SERVICE)
            async with grpc.aio.insecure_channel(victim.address) as to_victim:
                reply = await session_pb2_grpc.SessionServiceStub(to_victim).CreateSession(
                    session_pb2.CreateSessionRequest(agent_id="support-bot"), metadata=client
                )
                session_id = reply.session.session_id
                call: Any = chat_pb2_grpc.ChatServiceStub(to_victim).SendMessage(
                    chat_pb2.SendMessageRequest(session_id=session_id, content="Still there?"),
                    metadata=client,
                )
                first = await asyncio.wait_for(call.read(), TIMEOUT_S)
                job_id = first.event.job_id
                if hang == "append_history":
                    work = await platform.next_submit()
                    assert work.job_id == job_id and work.system_prompt
                    # The victim applies the completed notice and runs the finalize.
                    notices = task_update_pb2_grpc.TaskUpdateServiceStub(to_victim)
                    await notices.PublishUpdates(
                        iter([completed(job_id, 1, "Yes.")]), metadata=reporter
                    )
                await asyncio.wait_for(hold.entered.wait(), TIMEOUT_S)
                call.cancel()
            victim.kill()  # SIGKILL, mid-call
            hold.active = False  # the survivor's calls are answered

            if hang == "load_history":
                work = await platform.next_submit()
                assert work.job_id == job_id
                notices = task_update_pb2_grpc.TaskUpdateServiceStub(survivor.channel)
                await notices.PublishUpdates(
                    iter([completed(job_id, 1, "Yes.")]), metadata=reporter
                )
            final = await final_event(survivor.channel, session_id, client)
            assert kind_of(final) == "completed" and final.completed.result.text == "Yes."
            assert final.job_id == job_id
            # Handed over once; the turns stored once (asked twice when the answer was lost).
            assert state.submitted == []
            turns = state.turns[(TENANT, session_id)]
            assert [t.content for t in turns] == ["Still there?", "Yes."]
            expected_appends = 2 if hang == "append_history" else 1
            assert state.append_calls == [job_id] * expected_appends
            # Resumed at the first call not finished: the history is loaded again only when
            # the victim died loading it.
            assert len(state.history_calls) == (2 if hang == "load_history" else 1)
    finally:
        victim.kill()
        await platform.stop()

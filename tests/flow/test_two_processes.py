"""Two orchestrator processes on one Redis: a notice received by one reaches a client streaming
from the other."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from orchestrator.admin.v1 import admin_pb2, admin_pb2_grpc
from tests.support.downstream import RecordingDispatcher
from tests.support.flow import Flow, completed, kind_of, notice, read_events, read_to_end
from tests.support.processes import ServerProcess
from tests.support.servers import admin, running_server, test_settings


@pytest.fixture
def other_process(redis_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path / "other.log", REDIS_URL=redis_url)
    process.start()
    yield process
    process.kill()


async def test_a_notice_sent_to_one_process_reaches_a_stream_on_another(
    redis_url: str, other_process: ServerProcess
) -> None:
    dispatcher = RecordingDispatcher()
    async with running_server(test_settings(redis_url), dispatcher=dispatcher) as running:
        flow = Flow(running, dispatcher)
        # A real service key, stored in the shared Redis, so the other process accepts it.
        keys = admin_pb2_grpc.AdminServiceStub(running.channel)
        created = await keys.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(
                tenant_id="platform", role=admin_pb2.API_KEY_ROLE_SERVICE, description="test"
            ),
            metadata=admin(),
        )
        service_key = (("authorization", f"Bearer {created.api_key}"),)

        session_id = await flow.new_session()
        follower = flow.follow(session_id)
        call, accepted = await flow.start_job(session_id)
        await read_events(follower, 1)  # accepted

        async with grpc.aio.insecure_channel(other_process.address) as other:
            reply = await flow.publish(
                [
                    notice(accepted.job_id, 1, "delta", delta="hi"),
                    completed(accepted.job_id, 2, "hi"),
                ],
                metadata=service_key,
                channel=other,
            )
        assert reply.accepted == 2
        assert [kind_of(e) for e in await read_to_end(call)] == ["delta", "completed"]
        assert [kind_of(e) for e in await read_events(follower, 2)] == ["delta", "completed"]
        follower.cancel()

"""The reference services report to every orchestrator replica (REF_ORCHESTRATOR_ADDRESS
"a,b"): with one replica killed -9, jobs started through the other still complete, the ones in
flight included, and none of their notices is refused as job_finished. Real processes: two
`orchestrator serve` replicas on one redis-server, and `orchestrator-reference`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator.admin.v1 import admin_pb2, admin_pb2_grpc
from orchestrator.v1 import chat_pb2, chat_pb2_grpc, session_pb2, session_pb2_grpc
from tests.support.flow import EOF
from tests.support.processes import ServerProcess
from tests.support.redis_process import RedisProcess, free_port
from tests.support.reference_process import ReferenceProcess
from tests.support.servers import bearer

BOOTSTRAP_ADMIN_KEY = "ao_bootstrapfailover_" + "f" * 43
TIMEOUT_S = 20.0


@dataclass
class Replicas:
    first: ServerProcess
    second: ServerProcess
    reference: ReferenceProcess
    client: tuple[tuple[str, str], ...]


async def create_key(address: str, tenant_id: str, role: int) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await admin_pb2_grpc.AdminServiceStub(channel).CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant_id=tenant_id, role=role),  # type: ignore[arg-type]
            metadata=(bearer(BOOTSTRAP_ADMIN_KEY),),
            timeout=TIMEOUT_S,
        )
    api_key: str = reply.api_key
    return api_key


@pytest.fixture
def redis_for_replicas() -> Iterator[RedisProcess]:
    redis = RedisProcess()
    redis.start()
    yield redis
    redis.close()


@pytest.fixture
async def replicas(redis_for_replicas: RedisProcess, tmp_path: Path) -> AsyncIterator[Replicas]:
    reference_port = free_port()
    reference_address = f"127.0.0.1:{reference_port}"
    servers = [
        ServerProcess(
            tmp_path / f"replica{i}.log",
            REDIS_URL=redis_for_replicas.url,
            ORCH_BOOTSTRAP_ADMIN_KEY=BOOTSTRAP_ADMIN_KEY,
            ORCH_QUERY_SERVICE_ADDRESS=reference_address,
            ORCH_EMBEDDING_SERVICE_ADDRESS=reference_address,
            ORCH_SHUTDOWN_GRACE="1",
        )
        for i in (1, 2)
    ]
    reference: ReferenceProcess | None = None
    try:
        for server in servers:
            server.start()
        service_key = await create_key(
            servers[0].address, "platform", admin_pb2.API_KEY_ROLE_SERVICE
        )
        client_key = await create_key(servers[0].address, "acme", admin_pb2.API_KEY_ROLE_CLIENT)
        reference = ReferenceProcess(
            tmp_path / "reference.log",
            f"{servers[0].address},{servers[1].address}",
            service_key,
            port=reference_port,
            REF_STEP_DELAY="0.3",
        )
        reference.start()
        yield Replicas(servers[0], servers[1], reference, (bearer(client_key),))
    finally:
        if reference is not None:
            reference.kill()
        for server in servers:
            server.kill()


async def chat(address: str, client: Any, *, after_accepted: Any = None) -> list[str]:
    """Send a message through ``address`` and return the kinds of its events to the end;
    ``after_accepted`` runs once the accepted event and the next one arrived."""
    async with grpc.aio.insecure_channel(address) as channel:
        session = await session_pb2_grpc.SessionServiceStub(channel).CreateSession(
            session_pb2.CreateSessionRequest(agent_id="support-bot"),
            metadata=client,
            timeout=TIMEOUT_S,
        )
        call: Any = chat_pb2_grpc.ChatServiceStub(channel).SendMessage(
            chat_pb2.SendMessageRequest(
                session_id=session.session.session_id, content="What is an agent?"
            ),
            metadata=client,
            timeout=TIMEOUT_S,
        )

        async def collect() -> list[str]:
            kinds: list[str] = []
            while (message := await call.read()) is not EOF:
                kinds.append(str(message.event.WhichOneof("kind")))
                if len(kinds) == 2 and after_accepted is not None:
                    after_accepted()
            return kinds

        return await asyncio.wait_for(collect(), TIMEOUT_S)


async def test_jobs_through_one_replica_complete_while_the_other_is_killed(
    replicas: Replicas,
) -> None:
    # The reporter's stream goes to the first replica; kill it -9 with a job of the second in
    # flight: its notices fail over to the second at once.
    in_flight = await chat(
        replicas.second.address, replicas.client, after_accepted=replicas.first.kill
    )
    assert in_flight[0] == "accepted"
    assert in_flight[-1] == "completed", in_flight

    later = await asyncio.gather(
        *(chat(replicas.second.address, replicas.client) for _ in range(3))
    )
    assert all(kinds[-1] == "completed" for kinds in later), later

    # Completed, so never timed out and refused as job_finished; and the stream did fail over.
    log = replicas.reference.log()
    assert f"PublishUpdates to {replicas.first.address} failed" in log
    assert f"reconnecting to {replicas.second.address}" in log

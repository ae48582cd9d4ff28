"""The reference services report to every orchestrator replica (REF_ORCHESTRATOR_ADDRESS
"a,b"): with one replica killed -9, jobs started through the other still complete, the ones in
flight included, and none of their notices is refused as job_finished. Real processes: two
`orchestrator serve` replicas on one redis-server, and `orchestrator-reference`; and the
reporter alone over one round_robin target standing for two replicas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator.admin.v1 import admin_pb2
from orchestrator.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    common_pb2,
    session_pb2,
    session_pb2_grpc,
    task_update_pb2,
)
from reference.reporter import Notice, Reporter
from tests.support.admin_calls import create_api_key
from tests.support.flow import EOF
from tests.support.processes import ServerProcess
from tests.support.redis_process import RedisProcess, free_port
from tests.support.reference_process import ReferenceProcess
from tests.support.servers import bearer
from tests.support.task_updates import RecordingOrchestrator

BOOTSTRAP_ADMIN_KEY = "ao_bootstrapfailover_" + "f" * 43
TIMEOUT_S = 20.0


@dataclass
class Replicas:
    first: ServerProcess
    second: ServerProcess
    reference: ReferenceProcess
    client: tuple[tuple[str, str], ...]


async def create_key(address: str, tenant_id: str, role: int) -> str:
    return await create_api_key(address, BOOTSTRAP_ADMIN_KEY, tenant_id, role, TIMEOUT_S)


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
    assert f"ReportUpdates to {replicas.first.address} failed" in log
    assert f"reconnecting to {replicas.second.address}" in log


def progress(sequence: int) -> Notice:
    return Notice(
        event=task_update_pb2.NOTICE_EVENT_PROGRESS,
        service=common_pb2.SERVICE_QUERY,
        job_id="job-1",
        tenant_id="t",
        sequence=sequence,
    )


async def test_a_balanced_target_fails_over_at_once_keeping_the_order() -> None:
    """One round_robin target for two replicas (as a dns:/// name resolving to both would
    be): the replica holding the stream stops; the rest go to the other at once, in order."""
    replicas = [RecordingOrchestrator(), RecordingOrchestrator()]
    for replica in replicas:
        await replica.start()
    # A backoff would take at least 2.5 s: the failover must not wait for it.
    reporter = Reporter(
        f"ipv4:{replicas[0].address},{replicas[1].address}",
        (),
        reconnect_base_s=5.0,
        reconnect_cap_s=5.0,
    )
    reporter.start()
    try:
        for sequence in range(1, 21):
            reporter.publish(progress(sequence))

        # Whichever replica round_robin gave the stream receives the first twenty.
        def has_twenty(replica: RecordingOrchestrator) -> Callable[[], bool]:
            return lambda: len(replica.recorder.notices) >= 20

        waits = [asyncio.create_task(r.recorder.wait_until(has_twenty(r))) for r in replicas]
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        holder = replicas[waits.index(next(iter(done)))]
        other = replicas[1 - replicas.index(holder)]
        await holder.stop(None)
        for sequence in range(21, 41):
            reporter.publish(progress(sequence))

        def has_the_rest() -> bool:
            return set(range(21, 41)) <= {n.sequence for n in other.recorder.notices}

        await other.recorder.wait_until(has_the_rest, timeout_s=2.0)
        on_other = [n.sequence for n in other.recorder.notices]
        assert on_other == sorted(on_other), "a job's notices arrive in their order"
    finally:
        await reporter.stop(1)
        for replica in replicas:
            await replica.stop(None)

"""A server process killed (SIGKILL) and restarted mid-stream on Redis: the SDK's iterators
reconnect to the new process and go on from the last sequence, losing nothing and repeating
nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aorkestra import AsyncClient, RetryNotice, RetryPolicy, events
from domain.api_keys import format_key
from tests.sdk.collect import Collector
from tests.support.processes import ServerProcess
from tests.support.redis_process import free_port
from tests.support.reference_process import ReferenceProcess

ADMIN_KEY = format_key("sdkrestartadmin", "sdk-restart-admin-secret-0001")
# Reconnects keep trying across a process restart (seconds), with short pauses.
PATIENT = RetryPolicy(max_attempts=60, initial_backoff_s=0.05, max_backoff_s=0.5, max_reconnects=60)


@dataclass
class Deployment:
    tmp_path: Path
    redis_url: str
    port: int
    reference_port: int
    server: ServerProcess | None = None
    restarts: int = 0

    def start_server(self) -> None:
        reference = f"127.0.0.1:{self.reference_port}"
        self.server = ServerProcess(
            self.tmp_path / f"server-{self.restarts}.log",
            ORCH_LISTEN_ADDRESS=self.address,
            REDIS_URL=self.redis_url,
            ORCH_BOOTSTRAP_ADMIN_KEY=ADMIN_KEY,
            ORCH_QUERY_SERVICE_ADDRESS=reference,
            ORCH_EMBEDDING_SERVICE_ADDRESS=reference,
            ORCH_BATCH_WORKER_ENABLED="false",
        )
        self.restarts += 1
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def deployment(redis_url: str, tmp_path: Path) -> Iterator[Deployment]:
    running = Deployment(tmp_path, redis_url, free_port(), free_port())
    running.start_server()
    try:
        yield running
    finally:
        if running.server is not None:
            running.server.kill()


async def test_streams_continue_across_a_killed_and_restarted_server_without_loss_or_duplicate(
    deployment: Deployment, tmp_path: Path
) -> None:
    async with AsyncClient(deployment.address, api_key=ADMIN_KEY) as operator:
        client_key = (await operator.keys.create("acme", "client", "sdk test")).api_key
        service_key = (
            await operator.keys.create(
                "platform", "service", "reference", services=("query", "embedding")
            )
        ).api_key
    reference = ReferenceProcess(
        tmp_path / "reference.log",
        deployment.address,
        service_key,
        port=deployment.reference_port,
        REF_STEP_DELAY="0.3",
    )
    await asyncio.to_thread(reference.start)
    retries: list[RetryNotice] = []
    try:
        async with (
            AsyncClient(
                deployment.address, api_key=client_key, retry=PATIENT, on_retry=retries.append
            ) as follower_sdk,
            AsyncClient(deployment.address, api_key=client_key, retry=PATIENT) as sender,
        ):
            session = await sender.sessions.create("support-bot")
            mid_job = asyncio.Event()

            def mark(event: events.Event) -> None:
                if isinstance(event, events.Delta):
                    mid_job.set()

            follower = Collector(follower_sdk.sessions.follow(session.session_id), mark)
            first = sender.chat.send(session.session_id, "survive a restart")
            first_events = [await anext(first)]
            await asyncio.wait_for(mid_job.wait(), 20)

            assert deployment.server is not None
            deployment.server.kill()  # SIGKILL mid-job, mid-stream
            await asyncio.to_thread(deployment.start_server)

            first_events += [e async for e in first]  # the sender's stream resumes as well
            second = [e async for e in sender.chat.send(session.session_id, "and after it")]
            followed = await follower.until(second[-1].sequence, 60)

            log: list[events.Event] = []
            async for event in sender.sessions.follow(session.session_id):
                log.append(event)
                if event.sequence == followed[-1].sequence:
                    break
    finally:
        reference.kill()

    sequences = [e.sequence for e in followed]
    assert len(sequences) == len(set(sequences)), "an event was yielded twice"
    assert sequences == [e.sequence for e in log], "an event was lost"
    assert [e.kind for e in followed] == [e.kind for e in log]
    assert isinstance(first_events[-1], events.Completed)
    assert [e.sequence for e in first_events] == [
        e.sequence for e in log if e.job_id == first_events[0].job_id
    ]
    assert isinstance(second[-1], events.Completed)
    assert any(n.method == "StreamSession" for n in retries)

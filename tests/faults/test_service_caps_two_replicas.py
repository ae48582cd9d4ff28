"""The in-flight cap is shared by replicas: two real `orchestrator serve` processes on one real
redis-server, both sending to one (fake) Query service, get more messages of one tenant than
its cap allows, interactive ones (refused RESOURCE_EXHAUSTED and sent again after the RetryInfo
delay) and background ones (waiting in the chat queue). The Query service never has more of
the tenant's jobs than the cap at once, the cap is reached, and every message completes.

In flight at the service = jobs the Query service received minus jobs the test completed: the
test counts a job done before it sends its completed notice, so a place the notice frees can
only be taken after the count went down. The Redis in-flight set is sampled as well. The load
is bounded in count (MESSAGES + BACKGROUND) and time (the test's timeout)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from orchestrator.admin.v1 import admin_pb2
from orchestrator.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    task_update_pb2_grpc,
)
from registry.keys import KeySpace
from tests.support.admin_calls import create_api_key, retry_delay_ms
from tests.support.flow import completed, kind_of
from tests.support.platform_grpc import PlatformServer
from tests.support.processes import ServerProcess
from tests.support.servers import bearer

pytestmark = pytest.mark.timeout(120)

TENANT = "loaded"
CAP = 3
MESSAGES = 24  # interactive, each on its own session
BACKGROUND = 8  # background: through each replica's chat queue
BOOTSTRAP_ADMIN_KEY = "ao_bootstrapcaps_" + "c" * 43
# How long the Query service waits for another job before it completes one.
QUIET_S = 0.15
# Longest a sent message may take to complete, refusals and waits included.
MESSAGE_TIMEOUT_S = 60.0


@dataclass
class Load:
    """What the test saw: jobs at the Query service now and at most, refusals, completions."""

    in_flight: int = 0
    most_in_flight: int = 0
    most_in_redis: int = 0
    refused: int = 0
    completed: set[str] = field(default_factory=set)


@pytest.fixture
async def platform() -> AsyncIterator[PlatformServer]:
    server = PlatformServer(TENANT)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def replicas(
    redis_url: str, tmp_path: Path, platform: PlatformServer
) -> AsyncIterator[list[ServerProcess]]:
    env = {
        "REDIS_URL": redis_url,
        "ORCH_BOOTSTRAP_ADMIN_KEY": BOOTSTRAP_ADMIN_KEY,
        "ORCH_QUERY_SERVICE_ADDRESS": platform.address,
        "ORCH_EMBEDDING_SERVICE_ADDRESS": platform.address,
        "ORCH_SERVICE_IN_FLIGHT_CAP": str(CAP),
        "ORCH_LIMIT_RETRY_AFTER": "0.05",
        "ORCH_RATE_LIMIT_ENABLED": "false",
    }
    processes = [ServerProcess(tmp_path / f"replica{n}.log", **env) for n in (1, 2)]
    try:
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in processes))
        yield processes
    finally:
        for process in processes:
            process.kill()


async def send_until_accepted(
    channel: grpc.aio.Channel, client: Any, session_id: str, load: Load, **fields: Any
) -> str:
    """Send a message, again after the RetryInfo delay while it is refused; read its events to
    the final one; returns its job id."""
    chat = chat_pb2_grpc.ChatServiceStub(channel)
    while True:
        call = chat.SendMessage(
            chat_pb2.SendMessageRequest(session_id=session_id, content="work", **fields),
            metadata=client,
        )
        try:
            events = [message.event async for message in call]
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            load.refused += 1
            delay = retry_delay_ms(exc)
            assert delay == 50
            await asyncio.sleep(delay / 1000)
            continue
        assert [kind_of(e) for e in events] == ["accepted", "completed"], events
        return str(events[0].job_id)


async def serve_query(
    platform: PlatformServer,
    channels: list[grpc.aio.Channel],
    service_key: Any,
    load: Load,
    total: int,
) -> None:
    """Play the Query service: hold every job it gets, and complete the oldest one only when
    no new job came for QUIET_S (the replicas then start no more: refused messages are sent
    again and deferred ones tried again every 50 ms, so a start beyond the cap would show up
    here), through alternating replicas."""
    held: list[str] = []
    replica = itertools.cycle(channels)
    while len(load.completed) < total:
        try:
            submit = await platform.next_submit(timeout_s=QUIET_S)
        except TimeoutError:
            submit = None
        if submit is not None:
            assert submit.tenant_id == TENANT
            held.append(submit.job_id)
            load.in_flight += 1
            load.most_in_flight = max(load.most_in_flight, load.in_flight)
            continue
        if held:
            job_id = held.pop(0)
            load.in_flight -= 1  # before the notice frees its place
            stub = task_update_pb2_grpc.TaskUpdateServiceStub(next(replica))
            reply = await stub.PublishUpdates(
                iter([completed(job_id, 1, "done", tenant_id=TENANT)]), metadata=service_key
            )
            assert reply.accepted == 1
            load.completed.add(job_id)


async def sample_redis(redis_url: str, load: Load) -> None:
    """The tenant's in-flight set at Query in the shared Redis, read continually."""
    key = KeySpace().limits_prefix(TENANT) + "inflight:query"
    async with Redis.from_url(redis_url) as redis:
        while True:
            count = int(await redis.zcard(key))
            load.most_in_redis = max(load.most_in_redis, count)
            await asyncio.sleep(0.005)  # a reading, not a wait for an event


async def test_two_replicas_under_load_never_exceed_the_in_flight_cap(
    redis_url: str, platform: PlatformServer, replicas: list[ServerProcess]
) -> None:
    address = replicas[0].address
    client = (
        bearer(
            await create_api_key(
                address, BOOTSTRAP_ADMIN_KEY, TENANT, admin_pb2.API_KEY_ROLE_CLIENT
            )
        ),
    )
    service_key = (
        bearer(
            await create_api_key(
                address, BOOTSTRAP_ADMIN_KEY, "platform", admin_pb2.API_KEY_ROLE_SERVICE
            )
        ),
    )
    channels = [grpc.aio.insecure_channel(p.address) for p in replicas]
    load = Load()
    total = MESSAGES + BACKGROUND
    sampler = asyncio.create_task(sample_redis(redis_url, load))
    try:
        sessions = session_pb2_grpc.SessionServiceStub(channels[0])
        session_ids = [
            (
                await sessions.CreateSession(
                    session_pb2.CreateSessionRequest(agent_id="agent-1"), metadata=client
                )
            ).session.session_id
            for _ in range(total)
        ]
        senders = [
            send_until_accepted(channels[n % 2], client, session_id, load, background=n >= MESSAGES)
            for n, session_id in enumerate(session_ids)
        ]
        query = asyncio.create_task(serve_query(platform, channels, service_key, load, total))
        job_ids = await asyncio.wait_for(asyncio.gather(*senders), MESSAGE_TIMEOUT_S)
        await asyncio.wait_for(query, MESSAGE_TIMEOUT_S)
    finally:
        sampler.cancel()
        for channel in channels:
            await channel.close(grace=None)
    assert set(job_ids) == load.completed and len(load.completed) == total
    assert load.most_in_flight == CAP  # reached, never exceeded
    assert load.most_in_redis <= CAP
    assert load.refused > 0  # interactive messages were turned away at the cap
    for replica in replicas:
        assert "Traceback" not in replica.log()

"""Redis restarted under a running service, with real processes: `orchestrator serve`, the
reference services (`orchestrator-reference`) and a redis-server restarted on the same port.

Without its data (no persistence): the health probe sees the instance marker gone, logs an
ERROR, stores the bootstrap admin key again, and every stream whose record vanished ends with
ABORTED saying so, never OK without a final event. With its data (AOF): jobs in flight
complete and streams resume with nothing lost. At start the service warns when Redis has no
persistence.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator.admin.v1 import admin_pb2, admin_pb2_grpc
from orchestrator.v1 import (
    batch_pb2,
    batch_pb2_grpc,
    chat_pb2,
    chat_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
)
from tests.support.flow import EOF
from tests.support.processes import ServerProcess
from tests.support.redis_process import RedisProcess, free_port
from tests.support.reference_process import ReferenceProcess
from tests.support.servers import bearer, running_server, test_settings

BOOTSTRAP_ADMIN_KEY = "ao_bootstrapfaults_" + "b" * 43
LOSS_LINE = "Redis lost its data"
TIMEOUT_S = 15.0


@dataclass
class Stack:
    redis: RedisProcess
    server: ServerProcess
    reference: ReferenceProcess
    channel: grpc.aio.Channel
    client: tuple[tuple[str, str], ...]

    @property
    def chat(self) -> Any:
        return chat_pb2_grpc.ChatServiceStub(self.channel)

    @property
    def batches(self) -> Any:
        return batch_pb2_grpc.BatchServiceStub(self.channel)

    async def new_session(self) -> str:
        stub = session_pb2_grpc.SessionServiceStub(self.channel)
        reply = await stub.CreateSession(
            session_pb2.CreateSessionRequest(agent_id="support-bot"),
            metadata=self.client,
            timeout=TIMEOUT_S,
        )
        session_id: str = reply.session.session_id
        return session_id

    def send(self, session_id: str, content: str = "What is an agent?") -> Any:
        return self.chat.SendMessage(
            chat_pb2.SendMessageRequest(session_id=session_id, content=content),
            metadata=self.client,
            timeout=60,
        )

    def follow(self, session_id: str, after: int = 0) -> Any:
        return self.chat.StreamSession(
            chat_pb2.StreamSessionRequest(session_id=session_id, after_sequence=after),
            metadata=self.client,
            timeout=60,
        )

    def restart_redis(self, *, kill: bool) -> None:
        """Stop (or kill -9) Redis and start it again on the same port and data directory."""
        if kill:
            self.redis.kill()
        else:
            self.redis.stop()
        self.redis.start()


async def admin_call(channel: grpc.aio.Channel, tenant_id: str, role: int) -> str:
    """Create a key with the bootstrap admin key; returns the new key."""
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    reply = await stub.CreateApiKey(
        admin_pb2.CreateApiKeyRequest(tenant_id=tenant_id, role=role, description="faults"),  # type: ignore[arg-type]
        metadata=(bearer(BOOTSTRAP_ADMIN_KEY),),
        timeout=TIMEOUT_S,
    )
    api_key: str = reply.api_key
    return api_key


async def list_keys_as_admin(channel: grpc.aio.Channel) -> admin_pb2.ListApiKeysResponse:
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    reply: admin_pb2.ListApiKeysResponse = await stub.ListApiKeys(
        admin_pb2.ListApiKeysRequest(tenant_id="platform"),
        metadata=(bearer(BOOTSTRAP_ADMIN_KEY),),
        timeout=TIMEOUT_S,
    )
    return reply


async def wait_for_log(process: ServerProcess, pattern: str, timeout_s: float = TIMEOUT_S) -> str:
    """The first log line matching ``pattern``, once the process has written it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in process.log().splitlines():
            if re.search(pattern, line):
                return line
        await asyncio.sleep(0.05)
    raise AssertionError(f"no log line matching {pattern!r}:\n{process.log()[-4000:]}")


async def read_until_error(call: Any, timeout_s: float = TIMEOUT_S) -> tuple[list[Any], Any]:
    """Every message of a stream and how it ended: the AioRpcError, or None for OK."""
    messages: list[Any] = []

    async def collect() -> Any:
        try:
            while (message := await call.read()) is not EOF:
                messages.append(message)
        except grpc.aio.AioRpcError as exc:
            return exc
        return None

    ended = await asyncio.wait_for(collect(), timeout_s)
    return messages, ended


async def running_batch_followed(stack: Stack, size: int) -> tuple[str, Any]:
    """Submit a batch of ``size`` queries and follow its results; returns once every item is
    running (its job handed to the reference services): the batch id and the open stream."""
    items = [
        batch_pb2.BatchItem(
            custom_id=f"q{i}", kind=batch_pb2.BATCH_ITEM_KIND_LLM_QUERY, content="hello"
        )
        for i in range(size)
    ]
    submitted = await stack.batches.SubmitBatch(
        batch_pb2.SubmitBatchRequest(items=items), metadata=stack.client, timeout=TIMEOUT_S
    )
    batch_id: str = submitted.batch.batch_id
    results = stack.batches.StreamBatchResults(
        batch_pb2.StreamBatchResultsRequest(batch_id=batch_id),
        metadata=stack.client,
        timeout=90,
    )
    await wait_for_log(stack.server, f"batch {batch_id} .* queued")
    while True:
        batch = await stack.batches.GetBatch(
            batch_pb2.GetBatchRequest(batch_id=batch_id), metadata=stack.client
        )
        if batch.batch.counts.running == size:
            return batch_id, results
        await asyncio.sleep(0.05)


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Any]:
    started: list[Any] = []

    async def make(*, appendonly: bool, step_delay: float) -> Stack:
        redis = RedisProcess(appendonly=appendonly)
        redis.start()
        started.append(redis.close)
        reference_port = free_port()
        reference_address = f"127.0.0.1:{reference_port}"
        server = ServerProcess(
            tmp_path / "server.log",
            REDIS_URL=redis.url,
            ORCH_BOOTSTRAP_ADMIN_KEY=BOOTSTRAP_ADMIN_KEY,
            ORCH_HEALTH_INTERVAL="0.2",
            ORCH_QUERY_SERVICE_ADDRESS=reference_address,
            ORCH_EMBEDDING_SERVICE_ADDRESS=reference_address,
            ORCH_SHUTDOWN_GRACE="1",
        )
        server.start()
        started.append(server.kill)
        channel = grpc.aio.insecure_channel(server.address)
        service_key = await admin_call(channel, "platform", admin_pb2.API_KEY_ROLE_SERVICE)
        client_key = await admin_call(channel, "acme", admin_pb2.API_KEY_ROLE_CLIENT)
        reference = ReferenceProcess(
            tmp_path / "reference.log",
            server.address,
            service_key,
            port=reference_port,
            REF_STEP_DELAY=str(step_delay),
        )
        reference.start()
        started.append(reference.kill)
        return Stack(redis, server, reference, channel, (bearer(client_key),))

    yield make
    for stop in reversed(started):
        stop()


@pytest.fixture
async def stack_without_persistence(make_stack: Any) -> AsyncIterator[Stack]:
    """Redis without persistence; the reference services take about 6 s per query."""
    stack: Stack = await make_stack(appendonly=False, step_delay=1.0)
    yield stack
    await stack.channel.close(grace=None)


@pytest.fixture
async def stack_with_aof(make_stack: Any) -> AsyncIterator[Stack]:
    """Redis with AOF (fsync on every write); queries take about 2 s."""
    stack: Stack = await make_stack(appendonly=True, step_delay=0.4)
    yield stack
    await stack.channel.close(grace=None)


async def test_start_against_redis_without_persistence_warns(
    stack_without_persistence: Stack,
) -> None:
    line = await wait_for_log(stack_without_persistence.server, "WARNING.*no persistence")
    assert "appendonly yes" in line


async def test_start_against_redis_with_aof_does_not_warn(stack_with_aof: Stack) -> None:
    await wait_for_log(stack_with_aof.server, "serving on")
    assert "persistence" not in stack_with_aof.server.log()


async def test_lost_data_is_detected_logged_and_the_bootstrap_admin_key_works_again(
    stack_without_persistence: Stack,
) -> None:
    stack = stack_without_persistence
    await list_keys_as_admin(stack.channel)

    stack.restart_redis(kill=False)

    line = await wait_for_log(stack.server, "ERROR.*" + LOSS_LINE)
    assert "bootstrap admin key" in line
    # Within seconds of the ERROR the admin key is stored again (the same probe re-seeds it).
    deadline = time.monotonic() + 5.0
    reply = None
    while reply is None:
        assert time.monotonic() < deadline, "the bootstrap admin key was not re-seeded"
        with contextlib.suppress(grpc.aio.AioRpcError):
            reply = await list_keys_as_admin(stack.channel)
        await asyncio.sleep(0.1)
    assert [key.key_id for key in reply.keys] == ["bootstrapfaults"]
    assert stack.server.log().count(LOSS_LINE) == 1, "one loss is reported once"


async def test_a_message_in_flight_ends_aborted_when_redis_loses_its_job(
    stack_without_persistence: Stack,
) -> None:
    stack = stack_without_persistence
    session_id = await stack.new_session()
    follower = stack.follow(session_id)
    call = stack.send(session_id)
    accepted = await asyncio.wait_for(call.read(), TIMEOUT_S)
    assert accepted.event.WhichOneof("kind") == "accepted"
    assert (await asyncio.wait_for(follower.read(), TIMEOUT_S)).event == accepted.event

    stack.restart_redis(kill=False)

    events, ended = await read_until_error(call)
    assert ended is not None, f"SendMessage ended OK without a final event after {events}"
    assert ended.code() == grpc.StatusCode.ABORTED
    assert f"record of job {accepted.event.job_id} was lost" in ended.details()
    assert not any(e.event.WhichOneof("kind") == "completed" for e in events)

    _, follow_ended = await read_until_error(follower)
    assert follow_ended is not None, "StreamSession of a vanished session ended OK"
    assert follow_ended.code() == grpc.StatusCode.ABORTED
    assert f"record of session {session_id} was lost" in follow_ended.details()


async def test_a_batch_stream_ends_aborted_when_redis_loses_the_batch(
    stack_without_persistence: Stack,
) -> None:
    stack = stack_without_persistence
    # The items are running (their jobs handed to the reference services) when Redis goes.
    batch_id, results = await running_batch_followed(stack, size=3)

    stack.restart_redis(kill=False)

    streamed, ended = await read_until_error(results)
    assert ended is not None, f"StreamBatchResults ended OK after {streamed}"
    assert ended.code() == grpc.StatusCode.ABORTED
    assert f"record of batch {batch_id} was lost" in ended.details()
    # The worker's items of the vanished batch end without tracebacks (no crash loop).
    await wait_for_log(stack.server, "ERROR.*" + LOSS_LINE)
    log = stack.server.log()
    assert "Traceback" not in log, log[-4000:]
    assert log.count(" ERROR ") <= 1, log[-4000:]


async def test_with_aof_a_job_in_flight_completes_and_streams_resume_across_a_restart(
    stack_with_aof: Stack,
) -> None:
    stack = stack_with_aof
    session_id = await stack.new_session()
    follower = stack.follow(session_id)
    call = stack.send(session_id)
    accepted = await asyncio.wait_for(call.read(), TIMEOUT_S)
    assert accepted.event.WhichOneof("kind") == "accepted"
    followed = [await asyncio.wait_for(follower.read(), TIMEOUT_S)]  # the follow is in effect
    assert followed[0].event == accepted.event

    stack.restart_redis(kill=True)

    events, ended = await read_until_error(call, timeout_s=30)
    assert ended is None, f"SendMessage failed across the restart: {ended}"
    kinds = [e.event.WhichOneof("kind") for e in events]
    assert kinds[-1] == "completed", kinds
    assert "Reference answer to: What is an agent?" in events[-1].event.completed.result.text

    # The session's follower saw every event exactly once, in order, nothing lost.
    while followed[-1].event.WhichOneof("kind") != "completed":
        message = await asyncio.wait_for(follower.read(), TIMEOUT_S)
        assert message is not EOF
        followed.append(message)
    follower.cancel()
    sequences = [m.event.sequence for m in followed]
    assert sequences == list(range(1, len(sequences) + 1))
    assert sequences[-1] == events[-1].event.sequence
    # Keys work, and nothing was reported lost.
    await list_keys_as_admin(stack.channel)
    await stack.new_session()
    assert LOSS_LINE not in stack.server.log()


async def test_with_aof_a_batch_stream_waits_out_redis_being_down_and_ends_ok(
    stack_with_aof: Stack,
) -> None:
    stack = stack_with_aof
    batch_id, results = await running_batch_followed(stack, size=2)

    stack.redis.stop()
    # The open stream read while Redis was down (however long a restart takes on this machine).
    await wait_for_log(stack.server, f"result stream of batch {batch_id} waits for the backend")
    stack.redis.start()

    # An item whose handler met Redis down, and could not record that, runs again once its
    # lease (ORCH_BATCH_WORKER_LEASE, 30 s) runs out: the results may take that long.
    streamed, ended = await read_until_error(results, timeout_s=60)
    assert ended is None, f"StreamBatchResults failed across the restart: {ended}"
    assert sorted(r.result.custom_id for r in streamed) == ["q0", "q1"]
    assert [r.result.sequence for r in streamed] == sorted({r.result.sequence for r in streamed})


async def test_two_replicas_notice_one_loss_once_each_and_agree_on_the_new_marker(
    redis_url: str, redis_client: Any
) -> None:
    settings = test_settings(redis_url, health_interval=0.1)
    async with running_server(settings) as first, running_server(settings) as second:
        marker = await redis_client.get("ao:instance")
        assert marker

        await redis_client.flushall()  # what a restart without persistence leaves

        await asyncio.wait_for(first.server.data_loss.lost.wait(), TIMEOUT_S)
        await asyncio.wait_for(second.server.data_loss.lost.wait(), TIMEOUT_S)
        new_marker = await redis_client.get("ao:instance")
        assert new_marker not in (None, marker)
        # Neither overwrites the other's marker: after more probes nothing changed.
        for server in (first, second):
            await server.server.health.check_once()
        assert await redis_client.get("ao:instance") == new_marker
        assert (first.server.data_loss.losses, second.server.data_loss.losses) == (1, 1)

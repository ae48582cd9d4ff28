"""Faults around the hand-off of a job to its service ("accepted means it runs"): once a client
has seen `accepted`, the job reaches its service or fails with a reason, whatever the client or
the process that accepted it does next."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest

from domain.dispatch import CallContext, WorkRequest
from domain.queued_chat import ITEM_KIND
from orchestrator.admin.v1 import admin_pb2, admin_pb2_grpc
from orchestrator.v1 import chat_pb2, chat_pb2_grpc
from reference.app import ReferenceServices
from reference.config import ReferenceConfig
from tests.support.downstream import RecordingDispatcher
from tests.support.flow import EOF, TIMEOUT_S, Event, Flow, kind_of, read_to_end
from tests.support.processes import ServerProcess
from tests.support.redis_process import free_port
from tests.support.servers import admin, bearer, running_server, service, tenant, test_settings

# Each drop is tried this often: before the fix about half of the drops right after
# `accepted` lost their job.
TRIES = 8
FINAL_KINDS = ("completed", "failed", "timed_out", "cancelled")


@dataclass
class Platform:
    flow: Flow
    reference: ReferenceServices


@pytest.fixture
async def platform(backend_url: str | None) -> AsyncIterator[Platform]:
    """A real server (per backend) and the reference services reporting to it, with a short
    pause between notices so a client can drop between them."""
    orchestrator_port, reference_port = free_port(), free_port()
    settings = test_settings(
        backend_url,
        listen_address=f"127.0.0.1:{orchestrator_port}",
        query_service_address=f"127.0.0.1:{reference_port}",
        embedding_service_address=f"127.0.0.1:{reference_port}",
    )
    reference = ReferenceServices(
        ReferenceConfig(
            listen_address=f"127.0.0.1:{reference_port}",
            orchestrator_address=f"127.0.0.1:{orchestrator_port}",
            step_delay_s=0.01,
            publish_metadata=service(),
        )
    )
    async with running_server(settings) as running:
        await reference.start()
        try:
            yield Platform(Flow(running, RecordingDispatcher()), reference)
        finally:
            await reference.stop()


async def read_until(call: Any, kind: str) -> str:
    """Read a SendMessage call's events up to the first of ``kind``; returns the job id."""
    while True:
        message = await asyncio.wait_for(call.read(), TIMEOUT_S)
        assert message is not EOF, f"the stream ended before a {kind} event"
        if kind_of(message.event) == kind:
            return str(message.event.job_id)


async def final_event(
    channel: grpc.aio.Channel,
    session_id: str,
    job_id: str,
    metadata: Any,
    timeout_s: float = 5.0,
) -> Event:
    """The job's final event, read from the session's stream from its start."""
    follower = chat_pb2_grpc.ChatServiceStub(channel).StreamSession(
        chat_pb2.StreamSessionRequest(session_id=session_id, after_sequence=0),
        metadata=metadata,
    )

    async def final() -> Event:
        async for message in follower:
            event: Event = message.event
            if event.job_id == job_id and kind_of(event) in FINAL_KINDS:
                return event
        raise AssertionError("the session's stream ended before the job's final event")

    try:
        return await asyncio.wait_for(final(), timeout_s)
    finally:
        follower.cancel()


@pytest.mark.parametrize("drop_after", ["accepted", "progress", "delta"])
async def test_a_client_dropping_mid_chat_still_gets_its_job_done_and_the_session_freed(
    platform: Platform, drop_after: str
) -> None:
    flow = platform.flow
    for _ in range(TRIES):
        session_id = await flow.new_session()
        call = flow.send(session_id, "Will this be answered?")
        job_id = await read_until(call, drop_after)
        call.cancel()

        final = await final_event(flow.channel, session_id, job_id, tenant("acme"))
        assert kind_of(final) == "completed"
        assert job_id in {seen.job_id for seen in platform.reference.seen}
        # The session is not held by the dropped call's job: the next message runs at once.
        events = await read_to_end(flow.send(session_id, "And this one?"))
        assert not events[0].accepted.queued
        assert kind_of(events[-1]) == "completed"


@dataclass
class FailingDispatcher(RecordingDispatcher):
    """A downstream client that breaks in an unexpected way on every submit (not a
    DownstreamError: the hand-off itself cannot finish)."""

    attempts: list[str] = field(default_factory=list)

    async def submit(self, work: WorkRequest, ctx: CallContext) -> str:
        self.attempts.append(work.job_id)
        raise ConnectionResetError("connection reset by peer")


async def test_a_hand_off_that_keeps_failing_ends_failed_with_the_reason(
    backend_url: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = FailingDispatcher()
    settings = test_settings(backend_url, handoff_grace=0.3, handoff_attempts=3)
    async with running_server(settings, dispatcher=dispatcher) as running:
        flow = Flow(running, dispatcher)
        session_id = await flow.new_session()
        began = time.monotonic()
        events = await read_to_end(flow.send(session_id, "doomed"))
        took = time.monotonic() - began

    assert [kind_of(e) for e in events] == ["accepted", "failed"]
    error = events[-1].failed.error
    assert error.code == "handoff_failed" and error.retryable
    assert "query service" in error.message
    assert dispatcher.attempts == [events[0].job_id] * 3
    assert took < 5.0  # three leases of 0.3 s, not the 60 s heartbeat
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(events[0].job_id in w and "interrupted" in w for w in warnings)
    assert not any(r.exc_info for r in caplog.records)  # no traceback in the log


class BlackHoleQuery:
    """A Query service that accepts connections and never answers a submit."""

    def __init__(self) -> None:
        self.submitted = asyncio.Event()
        self.port = 0
        self._server = grpc.aio.server()

    async def start(self) -> str:
        async def never_answer(
            request: bytes, context: grpc.aio.ServicerContext[Any, Any]
        ) -> bytes:
            self.submitted.set()
            await asyncio.Event().wait()
            return b""

        handler = grpc.method_handlers_generic_handler(
            "query.v1.QueryService",
            {"SubmitQuery": grpc.unary_unary_rpc_method_handler(never_answer)},
        )
        self._server.add_generic_rpc_handlers((handler,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self._server.stop(grace=None)


async def test_a_process_killed_during_the_hand_off_leaves_the_job_to_another_within_seconds(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    black_hole = BlackHoleQuery()
    stuck_downstream = await black_hole.start()
    orchestrator_port, reference_port = free_port(), free_port()
    # The survivor: an in-process server whose downstream is the reference services.
    settings = test_settings(
        redis_url,
        listen_address=f"127.0.0.1:{orchestrator_port}",
        query_service_address=f"127.0.0.1:{reference_port}",
        embedding_service_address=f"127.0.0.1:{reference_port}",
        handoff_grace=1.0,
    )
    reference = ReferenceServices(
        ReferenceConfig(
            listen_address=f"127.0.0.1:{reference_port}",
            orchestrator_address=f"127.0.0.1:{orchestrator_port}",
            step_delay_s=0.0,
            publish_metadata=service(),
        )
    )
    # The victim: `orchestrator serve` on the same Redis, stuck in its submit to the black hole.
    victim = ServerProcess(
        tmp_path / "victim.log",
        REDIS_URL=redis_url,
        ORCH_QUERY_SERVICE_ADDRESS=stuck_downstream,
        ORCH_EMBEDDING_SERVICE_ADDRESS=stuck_downstream,
        ORCH_DOWNSTREAM_TIMEOUT="60",
        ORCH_HANDOFF_GRACE="1",
        ORCH_BATCH_WORKER_ENABLED="false",
    )
    try:
        async with running_server(settings) as survivor:
            await reference.start()
            await asyncio.to_thread(victim.start)
            # A real client key in the shared Redis, so the victim accepts it too.
            created = await admin_pb2_grpc.AdminServiceStub(survivor.channel).CreateApiKey(
                admin_pb2.CreateApiKeyRequest(
                    tenant_id="acme", role=admin_pb2.API_KEY_ROLE_CLIENT, description="test"
                ),
                metadata=admin(),
            )
            client = (bearer(created.api_key),)

            async with grpc.aio.insecure_channel(victim.address) as to_victim:
                session_id = await Flow(survivor, RecordingDispatcher()).new_session()
                call = chat_pb2_grpc.ChatServiceStub(to_victim).SendMessage(
                    chat_pb2.SendMessageRequest(session_id=session_id, content="Still there?"),
                    metadata=client,
                )
                job_id = await read_until(call, "accepted")
                await asyncio.wait_for(black_hole.submitted.wait(), TIMEOUT_S)
                # The victim holds the hand-off's lease while its submit goes on: no other
                # process takes the job over meanwhile (two leases' worth).
                await asyncio.sleep(2.0)
                assert job_id not in {seen.job_id for seen in reference.seen}
                victim.kill()  # SIGKILL, mid-submit
                killed = time.monotonic()

            final = await final_event(survivor.channel, session_id, job_id, client, timeout_s=15.0)
            took = time.monotonic() - killed
            await reference.stop()
    finally:
        victim.kill()
        await black_hole.stop()

    assert kind_of(final) == "completed"
    assert took < 8.0  # one lease (1 s) and a recovery pass, far below the 60 s heartbeat
    assert job_id in {seen.job_id for seen in reference.seen}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(job_id in w and "hand-off" in w and "interrupted" in w for w in warnings)


class StallingRedisPath:
    """A TCP path to Redis that stops delivering a connection's requests for good once one
    holds ``marker`` (as a network path that goes dark mid-request: the request never reaches
    Redis, the client waits for its reply). Everything else passes both ways."""

    def __init__(self, redis_url: str, marker: bytes) -> None:
        self._upstream = urlsplit(redis_url)
        self._marker = marker
        self.stalled = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        """Returns the Redis URL to give the client."""
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return self._upstream._replace(netloc=f"127.0.0.1:{port}").geturl()

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            self._upstream.hostname, self._upstream.port
        )
        replies = asyncio.create_task(self._pipe(up_reader, writer))
        self._tasks.add(replies)
        tail = b""
        try:
            while data := await reader.read(65536):
                if self._marker in tail + data:
                    self.stalled.set()
                    break
                tail = data[-len(self._marker) :]
                up_writer.write(data)
                await up_writer.drain()
            while await reader.read(65536):  # stalled: nothing more reaches Redis
                pass
        except ConnectionError:
            pass
        finally:
            replies.cancel()
            up_writer.close()
            writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()


async def test_a_process_killed_before_a_queued_jobs_enqueue_leaves_it_to_another_within_seconds(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The victim's path to Redis goes dark when it sends the chat work item: it has recorded
    # the queued job (its followers saw `accepted`) and waits for the enqueue's reply.
    path = StallingRedisPath(redis_url, ITEM_KIND.encode())
    victim_redis = await path.start()
    orchestrator_port, reference_port = free_port(), free_port()
    settings = test_settings(
        redis_url,
        listen_address=f"127.0.0.1:{orchestrator_port}",
        query_service_address=f"127.0.0.1:{reference_port}",
        embedding_service_address=f"127.0.0.1:{reference_port}",
        handoff_grace=1.0,
    )
    reference = ReferenceServices(
        ReferenceConfig(
            listen_address=f"127.0.0.1:{reference_port}",
            orchestrator_address=f"127.0.0.1:{orchestrator_port}",
            step_delay_s=0.0,
            publish_metadata=service(),
        )
    )
    victim = ServerProcess(
        tmp_path / "victim.log",
        REDIS_URL=victim_redis,
        ORCH_REDIS_SOCKET_TIMEOUT="60",  # it waits for the stalled enqueue until it is killed
        ORCH_QUERY_SERVICE_ADDRESS=f"127.0.0.1:{reference_port}",
        ORCH_EMBEDDING_SERVICE_ADDRESS=f"127.0.0.1:{reference_port}",
        ORCH_HANDOFF_GRACE="1",
        ORCH_BATCH_WORKER_ENABLED="false",
    )
    try:
        async with running_server(settings) as survivor:
            await reference.start()
            await asyncio.to_thread(victim.start)
            created = await admin_pb2_grpc.AdminServiceStub(survivor.channel).CreateApiKey(
                admin_pb2.CreateApiKeyRequest(
                    tenant_id="acme", role=admin_pb2.API_KEY_ROLE_CLIENT, description="test"
                ),
                metadata=admin(),
            )
            client = (bearer(created.api_key),)
            session_id = await Flow(survivor, RecordingDispatcher()).new_session()
            follower: Any = chat_pb2_grpc.ChatServiceStub(survivor.channel).StreamSession(
                chat_pb2.StreamSessionRequest(session_id=session_id), metadata=client
            )

            async with grpc.aio.insecure_channel(victim.address) as to_victim:
                sender = chat_pb2_grpc.ChatServiceStub(to_victim).SendMessage(
                    chat_pb2.SendMessageRequest(
                        session_id=session_id, content="Later, please", background=True
                    ),
                    metadata=client,
                )
                accepted = (await asyncio.wait_for(follower.read(), TIMEOUT_S)).event
                assert kind_of(accepted) == "accepted" and accepted.accepted.queued
                await asyncio.wait_for(path.stalled.wait(), TIMEOUT_S)
                victim.kill()  # SIGKILL, its enqueue never sent
                killed = time.monotonic()
                sender.cancel()

            async def final() -> Event:
                while True:
                    event: Event = (await follower.read()).event
                    if event.job_id == accepted.job_id and kind_of(event) in FINAL_KINDS:
                        return event

            final_event_ = await asyncio.wait_for(final(), 15.0)
            took = time.monotonic() - killed
            follower.cancel()
            # The session is free again: the next message runs at once.
            events = await read_to_end(Flow(survivor, RecordingDispatcher()).send(session_id))
            await reference.stop()
    finally:
        victim.kill()
        await path.stop()

    assert kind_of(final_event_) == "completed"
    assert took < 8.0  # one lease (1 s) and a recovery pass, not the 1 h queue timeout
    assert accepted.job_id in {seen.job_id for seen in reference.seen}
    assert not events[0].accepted.queued and kind_of(events[-1]) == "completed"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(accepted.job_id in w and "enqueue" in w and "interrupted" in w for w in warnings)


async def test_a_graceful_stop_finishes_the_hand_offs_in_progress(
    backend_url: str | None,
) -> None:
    dispatcher = SlowDispatcher(delay_s=0.5)
    settings = test_settings(backend_url, shutdown_grace=5.0)
    async with running_server(settings, dispatcher=dispatcher) as running:
        flow = Flow(running, dispatcher)
        session_id = await flow.new_session()
        call = flow.send(session_id, "hello")
        job_id = await read_until(call, "accepted")
        call.cancel()
        await asyncio.wait_for(dispatcher.started.wait(), TIMEOUT_S)
        await running.server.stop()  # while the submit is still on its way
    assert [work.job_id for work, _ in dispatcher.submitted] == [job_id]


@dataclass
class SlowDispatcher(RecordingDispatcher):
    """Takes ``delay_s`` to accept each submit."""

    delay_s: float = 0.5
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def submit(self, work: WorkRequest, ctx: CallContext) -> str:
        self.started.set()
        await asyncio.sleep(self.delay_s)
        return await super().submit(work, ctx)

"""The TypeScript client (sdk/typescript, Node and @grpc/grpc-js) against real processes: an
`orchestrator serve` on a redis-server, killed -9 and restarted on the same port mid-stream,
and `orchestrator-reference` reporting to it. The client's streams reconnect with backoff and
continue after the last sequence seen: nothing lost, nothing twice. `make ts` installs its npm
packages from its lock file and builds it (the fixture runs it)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator.admin.v1 import admin_pb2
from orchestrator.v1 import chat_pb2, chat_pb2_grpc, session_pb2, session_pb2_grpc
from tests.support.admin_calls import create_api_key
from tests.support.flow import EOF
from tests.support.processes import ServerProcess
from tests.support.redis_process import RedisProcess, free_port
from tests.support.reference_process import ReferenceProcess
from tests.support.servers import bearer

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / "sdk" / "typescript" / "dist" / "cli.js"
ADMIN_KEY = "ao_tsadmin_" + "a" * 43
SERVICE_KEY = "ao_tsservice_" + "s" * 43
TIMEOUT_S = 30.0
FINAL = {"completed", "failed", "timedOut", "cancelled"}


@pytest.fixture(scope="module")
def built_client() -> Path:
    node = shutil.which("node")
    assert node, "node is missing (the TypeScript client needs Node >= 18)"
    build = subprocess.run(
        ["make", "--no-print-directory", "-s", "ts"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    return CLI


@dataclass
class Stack:
    server: ServerProcess
    reference: ReferenceProcess
    client_key: str
    tmp_path: Path
    restarts: int = 0

    def kill_and_restart(self) -> None:
        """kill -9 the server, then start a new one on the same port."""
        self.server.kill()
        self.restarts += 1
        self.server = self.server.successor(self.tmp_path / f"server{self.restarts}.log")
        self.server.start()

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (bearer(self.client_key),)


@pytest.fixture
def redis() -> Iterator[RedisProcess]:
    proc = RedisProcess()
    proc.start()
    yield proc
    proc.close()


@asynccontextmanager
async def running_stack(redis: RedisProcess, tmp_path: Path, **env: str) -> AsyncIterator[Stack]:
    """Server (``env`` added to its configuration), reference services and a client key."""
    reference_address = f"127.0.0.1:{free_port()}"
    server = ServerProcess(
        tmp_path / "server0.log",
        REDIS_URL=redis.url,
        ORCH_BOOTSTRAP_ADMIN_KEY=ADMIN_KEY,
        ORCH_BOOTSTRAP_SERVICE_KEY=SERVICE_KEY,
        ORCH_QUERY_SERVICE_ADDRESS=reference_address,
        ORCH_EMBEDDING_SERVICE_ADDRESS=reference_address,
        ORCH_SHUTDOWN_GRACE="1",
        **env,
    )
    reference: ReferenceProcess | None = None
    stack: Stack | None = None
    try:
        server.start()
        client_key = await create_api_key(
            server.address, ADMIN_KEY, "acme", admin_pb2.API_KEY_ROLE_CLIENT, TIMEOUT_S
        )
        reference = ReferenceProcess(
            tmp_path / "reference.log",
            server.address,
            SERVICE_KEY,
            port=int(reference_address.rsplit(":", 1)[1]),
            REF_STEP_DELAY="0.3",
        )
        reference.start()
        stack = Stack(server, reference, client_key, tmp_path)
        yield stack
    finally:
        if reference is not None:
            reference.kill()
        (stack.server if stack else server).kill()


@pytest.fixture
async def stack(redis: RedisProcess, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(redis, tmp_path) as running:
        yield running


class Node:
    """The client's CLI in a child process: one JSON event per stdout line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def start(cls, cli: Path, stack: Stack, *args: str) -> Node:
        env = {
            **os.environ,
            "ORCH_ADDRESS": stack.server.address,
            "ORCH_API_KEY": stack.client_key,
        }
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(cli),
            *args,
            "--backoff-ms",
            "50",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def next_event(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), TIMEOUT_S)
        if not line:
            raise AssertionError(f"the client ended: {await self.stderr()}")
        event: dict[str, Any] = json.loads(line)
        self.events.append(event)
        return event

    async def until(self, kind: str, job_id: str | None = None) -> dict[str, Any]:
        while True:
            event = await self.next_event()
            if event["kind"] == kind and job_id in (None, event["job_id"]):
                return event

    async def exit_code(self) -> int:
        return await asyncio.wait_for(self.proc.wait(), TIMEOUT_S)

    async def stderr(self) -> str:
        assert self.proc.stderr is not None
        return (await asyncio.wait_for(self.proc.stderr.read(), TIMEOUT_S)).decode()

    def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


@pytest.fixture
async def nodes() -> AsyncIterator[list[Node]]:
    started: list[Node] = []
    yield started
    for node in started:
        node.stop()
        await node.proc.wait()


async def create_session(stack: Stack) -> str:
    async with grpc.aio.insecure_channel(stack.server.address) as channel:
        reply = await session_pb2_grpc.SessionServiceStub(channel).CreateSession(
            session_pb2.CreateSessionRequest(agent_id="support-bot"),
            metadata=stack.metadata,
            timeout=TIMEOUT_S,
        )
    session_id: str = reply.session.session_id
    return session_id


async def send_until_accepted(stack: Stack, session_id: str, content: str) -> str:
    """Send a message through the server and return its job id once it was accepted."""
    async with grpc.aio.insecure_channel(stack.server.address) as channel:
        call: Any = chat_pb2_grpc.ChatServiceStub(channel).SendMessage(
            chat_pb2.SendMessageRequest(session_id=session_id, content=content),
            metadata=stack.metadata,
            timeout=TIMEOUT_S,
        )
        first = await call.read()
        call.cancel()  # the job runs on whatever happens to this call
    assert first.event.WhichOneof("kind") == "accepted"
    job_id: str = first.event.job_id
    return job_id


async def server_sequences(stack: Stack, session_id: str, last_job: str) -> list[int]:
    """The session's sequences as the server has them, to the final event of ``last_job``."""
    async with grpc.aio.insecure_channel(stack.server.address) as channel:
        call: Any = chat_pb2_grpc.ChatServiceStub(channel).StreamSession(
            chat_pb2.StreamSessionRequest(session_id=session_id, after_sequence=0),
            metadata=stack.metadata,
            timeout=TIMEOUT_S,
        )
        sequences: list[int] = []
        while (message := await call.read()) is not EOF:
            sequences.append(message.event.sequence)
            kind = message.event.WhichOneof("kind")
            if message.event.job_id == last_job and kind in {"completed", "failed", "cancelled"}:
                call.cancel()
                return sequences
    raise AssertionError(f"the session stream ended before job {last_job} finished")


async def test_follow_continues_after_a_killed_server_with_no_loss_and_no_duplicate(
    built_client: Path, stack: Stack, nodes: list[Node]
) -> None:
    session_id = await create_session(stack)
    follower = await Node.start(built_client, stack, "follow", session_id)
    nodes.append(follower)
    first_job = await send_until_accepted(stack, session_id, "first")
    await follower.until("completed", first_job)

    second_job = await send_until_accepted(stack, session_id, "second")
    await follower.until("accepted", second_job)
    stack.kill_and_restart()  # mid-stream: the second job's deltas are still to come
    await follower.until("completed", second_job)

    seen = [event["sequence"] for event in follower.events]
    assert seen == await server_sequences(stack, session_id, second_job)
    assert len(seen) == len(set(seen))


async def test_send_goes_on_from_the_session_stream_after_a_killed_server(
    built_client: Path, stack: Stack, nodes: list[Node]
) -> None:
    session_id = await create_session(stack)
    sender = await Node.start(built_client, stack, "send", session_id, "What is an agent?")
    nodes.append(sender)
    accepted = await sender.until("accepted")
    stack.kill_and_restart()
    while (await sender.next_event())["kind"] not in FINAL:
        pass
    assert await sender.exit_code() == 0

    job_id = accepted["job_id"]
    assert {event["job_id"] for event in sender.events} == {job_id}
    assert sender.events[-1]["kind"] == "completed"
    seen = [event["sequence"] for event in sender.events]
    assert seen == await server_sequences(stack, session_id, job_id)


async def test_follow_ends_when_the_session_is_closed(
    built_client: Path, stack: Stack, nodes: list[Node]
) -> None:
    session_id = await create_session(stack)
    follower = await Node.start(built_client, stack, "follow", session_id)
    nodes.append(follower)
    job_id = await send_until_accepted(stack, session_id, "hello")
    await follower.until("completed", job_id)
    async with grpc.aio.insecure_channel(stack.server.address) as channel:
        await session_pb2_grpc.SessionServiceStub(channel).CloseSession(
            session_pb2.CloseSessionRequest(session_id=session_id),
            metadata=stack.metadata,
            timeout=TIMEOUT_S,
        )
    assert await follower.exit_code() == 0


async def test_a_refused_stream_is_an_error_not_a_retry(
    built_client: Path, stack: Stack, nodes: list[Node]
) -> None:
    follower = await Node.start(built_client, stack, "follow", "not-a-session-id")
    nodes.append(follower)
    assert await follower.exit_code() == 1
    message = await follower.stderr()
    assert "INVALID_ARGUMENT" in message
    assert "session_id" in message
    assert "request " in message, "the error names the request id"


async def test_follow_raises_history_truncated_by_default(
    built_client: Path, redis: RedisProcess, tmp_path: Path, nodes: list[Node]
) -> None:
    async with running_stack(redis, tmp_path, ORCH_EVENT_LOG_MAX_EVENTS="2") as short_log:
        session_id = await create_session(short_log)
        job_id = await send_until_accepted(short_log, session_id, "hello")
        await server_sequences(short_log, session_id, job_id)  # the job has finished
        follower = await Node.start(built_client, short_log, "follow", session_id, "--after", "1")
        nodes.append(follower)
        assert await follower.exit_code() == 1
        assert "no longer retained" in await follower.stderr()
        assert follower.events == []


async def test_follow_can_yield_history_truncated_and_go_on(
    built_client: Path, redis: RedisProcess, tmp_path: Path, nodes: list[Node]
) -> None:
    async with running_stack(redis, tmp_path, ORCH_EVENT_LOG_MAX_EVENTS="2") as short_log:
        session_id = await create_session(short_log)
        job_id = await send_until_accepted(short_log, session_id, "hello")
        retained = (await server_sequences(short_log, session_id, job_id))[-2:]
        follower = await Node.start(
            built_client,
            short_log,
            "follow",
            session_id,
            "--after",
            "1",
            "--history-truncated",
            "yield",
        )
        nodes.append(follower)
        truncated = await follower.until("historyTruncated")
        assert truncated["sequence"] == retained[0] - 1  # the server's cursor after the gap
        await follower.until("completed", job_id)
        assert [e["sequence"] for e in follower.events[1:]] == retained

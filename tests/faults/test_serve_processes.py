"""`orchestrator serve --processes N`: real processes on one port (SO_REUSEPORT) and one real
redis-server. Which process a connection reached is read from the processes' own /metrics
(process i serves it on the configured metrics port + i): a ListSessions call on a channel
counts on the process that answered it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.admin.v1 import admin_pb2
from orchestrator.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    task_update_pb2_grpc,
)
from tests.support.admin_calls import create_api_key
from tests.support.flow import completed, kind_of, notice
from tests.support.platform_grpc import PlatformServer
from tests.support.processes import BIN, ServerProcess
from tests.support.redis_process import free_port
from tests.support.servers import bearer

pytestmark = pytest.mark.timeout(90)

TENANT = "spread"
BOOTSTRAP_ADMIN_KEY = "ao_bootstrapprocs_" + "p" * 43
LIST_SESSIONS = "ListSessions"
# Separate connections per channel: each may land on another process.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
Metadata = tuple[tuple[str, str], ...]


def two_free_ports() -> int:
    """A port p such that p and p + 1 are free on loopback now."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def list_calls(metrics_port: int) -> float:
    """ListSessions calls the process with /metrics on ``metrics_port`` has answered."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "orchestrator_rpcs"
        for sample in family.samples
        if sample.name.endswith("_total") and LIST_SESSIONS in sample.labels.get("method", "")
    )


class Spread:
    """`orchestrator serve --processes 2` on REDIS_URL, with its metrics ports."""

    def __init__(self, process: ServerProcess, metrics_port: int) -> None:
        self.process = process
        self.metrics_ports = [metrics_port, metrics_port + 1]

    async def wait_all_serving(self) -> None:
        """Every process logged that it serves (after its gRPC server started) and its
        /metrics answers (the supervisor's health probe reached only one of them)."""
        for _ in range(400):
            if self.process.log().count("serving on") >= 2:
                break
            await asyncio.sleep(0.05)  # a log line in another process: nothing to await
        else:
            raise RuntimeError(f"not both processes serve:\n{self.process.log()}")
        for port in self.metrics_ports:
            for _ in range(200):
                try:
                    await asyncio.to_thread(list_calls, port)
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            else:
                raise RuntimeError(f"no process serves /metrics on {port}")

    async def process_of(self, channel: grpc.aio.Channel, client: Metadata) -> int:
        """The index of the process ``channel`` is connected to."""
        before = [await asyncio.to_thread(list_calls, port) for port in self.metrics_ports]
        sessions = session_pb2_grpc.SessionServiceStub(channel)
        await sessions.ListSessions(session_pb2.ListSessionsRequest(), metadata=client)
        after = [await asyncio.to_thread(list_calls, port) for port in self.metrics_ports]
        grown = [n for n, (b, a) in enumerate(zip(before, after, strict=True)) if a > b]
        assert len(grown) == 1, (before, after)
        return grown[0]

    async def one_channel_per_process(self, client: Metadata) -> list[grpc.aio.Channel]:
        """A channel connected to process 0 and one to process 1 (new connections until the
        kernel has put one on each)."""
        found: dict[int, grpc.aio.Channel] = {}
        for _ in range(24):
            channel = grpc.aio.insecure_channel(self.process.address, options=OWN_CONNECTION)
            index = await self.process_of(channel, client)
            if index in found:
                await channel.close(None)
            else:
                found[index] = channel
            if len(found) == 2:
                return [found[0], found[1]]
        raise AssertionError(f"24 connections all reached process {set(found)}")


@pytest.fixture
async def platform() -> AsyncIterator[PlatformServer]:
    server = PlatformServer(TENANT)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def spread(redis_url: str, tmp_path: Path, platform: PlatformServer) -> AsyncIterator[Spread]:
    metrics_port = two_free_ports()
    process = ServerProcess(
        tmp_path / "spread.log",
        REDIS_URL=redis_url,
        ORCH_BOOTSTRAP_ADMIN_KEY=BOOTSTRAP_ADMIN_KEY,
        ORCH_QUERY_SERVICE_ADDRESS=platform.address,
        ORCH_EMBEDDING_SERVICE_ADDRESS=platform.address,
        ORCH_METRICS_ADDRESS=f"127.0.0.1:{metrics_port}",
        ORCH_RATE_LIMIT_ENABLED="false",
    )
    process.serve_args = ["--processes", "2"]
    children: list[int] = []
    try:
        # Two processes start at once on the shared 2-core machine: give them time.
        await asyncio.to_thread(process.start, 60.0)
        assert process.proc is not None
        children = children_of(process.proc.pid)
        spread = Spread(process, metrics_port)
        await spread.wait_all_serving()
        yield spread
    finally:
        if process.proc is not None and process.proc.poll() is None:
            process.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.proc.wait(timeout=30)
        for child in children:
            if running(child):
                os.kill(child, signal.SIGKILL)
        process.kill()


async def client_key(spread: Spread, role: int = admin_pb2.API_KEY_ROLE_CLIENT) -> Metadata:
    """Metadata with a new key of TENANT (a client) or of "platform" (a service)."""
    tenant = TENANT if role == admin_pb2.API_KEY_ROLE_CLIENT else "platform"
    key = await create_api_key(spread.process.address, BOOTSTRAP_ADMIN_KEY, tenant, role)
    return (bearer(key),)


def children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(child) for child in children.read().split()]


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_both_processes_answer_calls_on_the_one_port(spread: Spread) -> None:
    client = await client_key(spread)
    channels = await spread.one_channel_per_process(client)
    for channel in channels:
        await channel.close(None)
    assert "Traceback" not in spread.process.log()


async def test_a_chat_started_on_one_process_is_followed_on_the_other(
    spread: Spread, platform: PlatformServer
) -> None:
    client = await client_key(spread)
    service_key = await client_key(spread, admin_pb2.API_KEY_ROLE_SERVICE)
    first, second = await spread.one_channel_per_process(client)
    try:
        created = await session_pb2_grpc.SessionServiceStub(first).CreateSession(
            session_pb2.CreateSessionRequest(agent_id="agent-1"), metadata=client
        )
        session_id = created.session.session_id
        follower = chat_pb2_grpc.ChatServiceStub(second).StreamSession(
            chat_pb2.StreamSessionRequest(session_id=session_id), metadata=client
        )
        sender = chat_pb2_grpc.ChatServiceStub(first).SendMessage(
            chat_pb2.SendMessageRequest(session_id=session_id, content="hello"), metadata=client
        )
        accepted: Any = await follower.read()
        assert kind_of(accepted.event) == "accepted"
        submit = await platform.next_submit()
        assert submit.job_id == accepted.event.job_id
        reply = await task_update_pb2_grpc.TaskUpdateServiceStub(second).PublishUpdates(
            iter(
                [
                    notice(submit.job_id, 1, "delta", delta="hi", tenant_id=TENANT),
                    completed(submit.job_id, 2, "hi", tenant_id=TENANT),
                ]
            ),
            metadata=service_key,
        )
        assert reply.accepted == 2
        followed = [kind_of(cast(Any, await follower.read()).event) for _ in range(2)]
        sent = [kind_of(message.event) async for message in sender]
        follower.cancel()
    finally:
        await first.close(None)
        await second.close(None)
    assert followed == ["delta", "completed"]
    assert sent == ["accepted", "delta", "completed"]


async def test_sigterm_to_the_supervisor_stops_every_process(spread: Spread) -> None:
    proc = spread.process.proc
    assert proc is not None
    children = children_of(proc.pid)
    assert len(children) == 2
    assert spread.process.terminate(timeout_s=30) == 0
    assert not any(running(child) for child in children)
    assert "all 2 server processes stopped" in spread.process.log()


def test_the_memory_registry_refuses_more_than_one_process(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["ORCH_LISTEN_ADDRESS"] = f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        [str(BIN / "orchestrator"), "serve", "--processes", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "--processes 2 needs REDIS_URL" in result.stderr
    assert "in-memory registry" in result.stderr


@pytest.mark.parametrize(("setting", "loop"), [(None, "uvloop"), ("asyncio", "asyncio")])
def test_serve_runs_on_the_configured_event_loop(
    tmp_path: Path, setting: str | None, loop: str
) -> None:
    env = {} if setting is None else {"ORCH_EVENT_LOOP": setting}
    process = ServerProcess(tmp_path / "loop.log", **env)
    if setting is None:
        process._env.pop("ORCH_EVENT_LOOP", None)
    try:
        process.start()
        assert process.terminate() == 0
    finally:
        process.kill()
    assert f"on the {loop} event loop" in process.log()

"""What a new user tripped over, each run as they would: the real `orchestrator` binary in a child
process (and a real redis-server where Redis is the point)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from orchestrator.admin.v1 import admin_pb2
from orchestrator.v1 import chat_pb2, chat_pb2_grpc, session_pb2, session_pb2_grpc
from server.key_seeding import DEMO_KEYS
from server.listen import EXIT_ADDRESS_IN_USE
from tests.rpc.test_downstream_watch import until
from tests.support.admin_calls import create_api_key
from tests.support.flow import kind_of, read_to_end
from tests.support.processes import BIN, ServerProcess, make_run_server
from tests.support.redis_process import RedisProcess, free_port
from tests.support.servers import bearer

TIMEOUT_S = 30.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def orchestrator(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `orchestrator ARGS` to its end; REDIS_URL and ORCH_* come from ``env`` only."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "REDIS_URL"))}
    return subprocess.run(
        [str(BIN / "orchestrator"), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


@pytest.fixture
def redis() -> Iterator[RedisProcess]:
    process = RedisProcess()
    process.start()
    yield process
    process.close()


def test_a_busy_port_is_one_clear_line_and_exit_code_3(tmp_path: Path) -> None:
    first = ServerProcess(tmp_path / "first.log")
    first.start()
    try:
        second = orchestrator(
            "serve",
            ORCH_LISTEN_ADDRESS=first.address,
            ORCH_WS_ADDRESS="127.0.0.1:0",
            ORCH_METRICS_ADDRESS="127.0.0.1:0",
        )
    finally:
        first.kill()
    assert second.returncode == EXIT_ADDRESS_IN_USE
    assert "Traceback" not in second.stderr + second.stdout
    assert second.stderr.strip().splitlines() == [
        f"orchestrator: cannot listen on {first.address} (ORCH_LISTEN_ADDRESS): the address is "
        "already in use (is another server running?)"
    ]


def test_a_busy_websocket_port_names_its_setting(tmp_path: Path) -> None:
    first = ServerProcess(tmp_path / "first.log", ORCH_WS_ADDRESS=f"127.0.0.1:{free_port()}")
    first.start()
    try:
        second = orchestrator(
            "serve",
            ORCH_LISTEN_ADDRESS=f"127.0.0.1:{free_port()}",
            ORCH_WS_ADDRESS=first._env["ORCH_WS_ADDRESS"],
            ORCH_METRICS_ADDRESS="127.0.0.1:0",
        )
    finally:
        first.kill()
    assert second.returncode == EXIT_ADDRESS_IN_USE
    assert "(ORCH_WS_ADDRESS)" in second.stderr
    assert "Traceback" not in second.stderr


def test_settings_prints_the_values_in_effect_and_where_they_come_from() -> None:
    done = orchestrator(
        "settings",
        ORCH_JOB_DEADLINE="42",
        REDIS_URL="redis://app:hunter2@redis.internal:6380/0",
        ORCH_BOOTSTRAP_ADMIN_KEY="ao_bootkey01_" + "s" * 30,
    )
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()}
    assert rows["ORCH_JOB_DEADLINE"] == ["42.0", "(environment)"]
    assert rows["ORCH_JOB_HEARTBEAT"] == ["60.0", "(default)"]
    assert rows["REDIS_URL"] == ["redis://app:***@redis.internal:6380/0", "(environment)"]
    assert rows["ORCH_BOOTSTRAP_ADMIN_KEY"] == ["ao_bootkey01_***", "(environment)"]
    assert "hunter2" not in done.stdout
    assert "s" * 30 not in done.stdout


def test_settings_refuses_a_bad_value_like_serve_does() -> None:
    done = orchestrator("settings", ORCH_JOB_DEADLINE="soon")
    assert done.returncode == 2
    assert "configuration error: ORCH_JOB_DEADLINE='soon'" in done.stderr


def test_settings_defaults_lists_defaults_and_descriptions() -> None:
    done = orchestrator("settings", "--defaults", ORCH_JOB_DEADLINE="42")
    assert done.returncode == 0
    line = next(x for x in done.stdout.splitlines() if x.startswith("ORCH_JOB_DEADLINE "))
    assert line.split()[1] == "300.0"
    assert "a job times out" in line


def test_help_says_the_worker_runs_queued_chat_messages_too() -> None:
    top = orchestrator("--help")
    assert top.returncode == 0
    assert "batch items and queued chat messages" in " ".join(top.stdout.split())
    worker = orchestrator("worker", "--help")
    assert "queued chat messages" in " ".join(worker.stdout.split())


async def test_redis_without_keys_warns_at_start_and_refused_demo_keys_say_why(
    tmp_path: Path, redis: RedisProcess
) -> None:
    server = ServerProcess(tmp_path / "server.log", REDIS_URL=redis.url)
    server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = session_pb2_grpc.SessionServiceStub(channel)
            demo_client = next(d for d in DEMO_KEYS if d.tenant_id == "demo")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListSessions(
                    session_pb2.ListSessionsRequest(), metadata=(bearer(demo_client.api_key),)
                )
        log = server.log()
    finally:
        server.kill()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    details = refused.value.details() or ""
    assert details.startswith(
        "invalid or revoked API key: the demo keys exist only in the in-memory"
    )
    assert "ORCH_BOOTSTRAP_ADMIN_KEY" in details
    assert "no API key of tenant platform in this registry" in log


def test_make_run_stops_promptly_with_exit_code_0(tmp_path: Path) -> None:
    server = make_run_server(tmp_path / "server.log")
    server.start()
    try:
        assert server.terminate() == 0
    finally:
        server.kill()
    log = server.log()
    assert "reference services stopped" in log
    assert "unsent" not in log
    assert "stopped" in log.splitlines()[-1]


async def test_make_run_warns_when_a_configured_downstream_is_unreachable(tmp_path: Path) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    server = make_run_server(tmp_path / "server.log", ORCH_CONVERSATION_ADDRESS=nowhere)
    server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            await until(channel, "downstream:conversation", NOT_SERVING)
            await until(channel, "downstream:query", SERVING)
        unhealthy = orchestrator(
            "health", "--address", server.address, "--service", "downstream:conversation"
        )
        healthy = orchestrator(
            "health", "--address", server.address, "--service", "downstream:query"
        )
    finally:
        server.terminate()
        server.kill()
    assert f"downstream conversation at {nowhere} is unreachable" in server.log()
    assert "downstream query at" not in server.log()
    assert (unhealthy.returncode, unhealthy.stdout.strip()) == (1, "NOT_SERVING")
    assert (healthy.returncode, healthy.stdout.strip()) == (0, "SERVING")


async def test_make_run_on_redis_answers_a_chat_and_stops_promptly(
    tmp_path: Path, redis: RedisProcess
) -> None:
    admin_key = "ao_makerunredis_" + "r" * 40
    server = make_run_server(
        tmp_path / "server.log", REDIS_URL=redis.url, ORCH_BOOTSTRAP_ADMIN_KEY=admin_key
    )
    server.start()
    try:
        client = await create_api_key(
            server.address, admin_key, "demo", admin_pb2.API_KEY_ROLE_CLIENT
        )
        async with grpc.aio.insecure_channel(server.address) as channel:
            created = await session_pb2_grpc.SessionServiceStub(channel).CreateSession(
                session_pb2.CreateSessionRequest(agent_id="support-bot"),
                metadata=(bearer(client),),
                timeout=TIMEOUT_S,
            )
            call = chat_pb2_grpc.ChatServiceStub(channel).SendMessage(
                chat_pb2.SendMessageRequest(
                    session_id=created.session.session_id, content="What is an agent?"
                ),
                metadata=(bearer(client),),
                timeout=TIMEOUT_S,
            )
            events = await read_to_end(call)
        assert server.terminate() == 0
    finally:
        server.kill()
    assert kind_of(events[-1]) == "completed"
    assert events[-1].completed.result.text.startswith("Reference answer to: ")
    log = server.log()
    assert "UNAUTHENTICATED" not in log  # the embedded services' key exists in this Redis
    assert "unsent" not in log

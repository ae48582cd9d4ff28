"""Drive a real `orchestrator serve` process with the real grpcurl binary, as a user would."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import BIN, ServerProcess

GRPCURL = str(BIN / "grpcurl")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The service with its embedded defaults (no REDIS_URL), as `make run` starts it."""
    server = ServerProcess(tmp_path_factory.mktemp("serve") / "server.log")
    server.start()
    yield server
    server.kill()


def grpcurl(
    server: ServerProcess, *target: str, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """`grpcurl -plaintext FLAGS ADDRESS TARGET...`"""
    return subprocess.run(
        [GRPCURL, "-plaintext", *flags, server.address, *target],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def call(
    server: ServerProcess, method: str, body: dict[str, object], tenant: str = "demo"
) -> subprocess.CompletedProcess[str]:
    flags = ("-H", f"x-tenant-id: {tenant}", "-d", json.dumps(body))
    return grpcurl(server, f"orchestrator.v1.{method}", flags=flags)


def test_list_shows_the_four_services_health_and_reflection(served: ServerProcess) -> None:
    result = grpcurl(served, "list")
    assert result.returncode == 0, result.stderr
    services = set(result.stdout.split())
    assert {
        "orchestrator.v1.SessionService",
        "orchestrator.v1.ChatService",
        "orchestrator.v1.BatchService",
        "orchestrator.v1.TaskUpdateService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services


def test_describe_shows_documented_messages(served: ServerProcess) -> None:
    result = grpcurl(served, "describe", "orchestrator.v1.CreateSessionRequest")
    assert result.returncode == 0, result.stderr
    assert "agent_id" in result.stdout


def test_health_check_is_serving(served: ServerProcess) -> None:
    result = grpcurl(served, "grpc.health.v1.Health/Check")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "SERVING"}


def test_create_then_get_round_trips(served: ServerProcess) -> None:
    created = call(served, "SessionService/CreateSession", {"agent_id": "support-bot"})
    assert created.returncode == 0, created.stderr
    session = json.loads(created.stdout)["session"]
    got = call(served, "SessionService/GetSession", {"session_id": session["session_id"]})
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["session"]["agent_id"] == "support-bot"


def test_unknown_session_is_not_found(served: ServerProcess) -> None:
    result = call(
        served,
        "SessionService/GetSession",
        {"session_id": "01900000-0000-7000-8000-000000000000"},
    )
    assert result.returncode != 0
    assert "Code: NotFound" in result.stderr


def test_another_tenants_session_is_not_found(served: ServerProcess) -> None:
    created = call(served, "SessionService/CreateSession", {"agent_id": "a"}, tenant="demo")
    session_id = json.loads(created.stdout)["session"]["session_id"]
    result = call(served, "SessionService/GetSession", {"session_id": session_id}, tenant="other")
    assert "Code: NotFound" in result.stderr


def test_missing_agent_id_is_invalid_argument_naming_the_field(served: ServerProcess) -> None:
    result = call(served, "SessionService/CreateSession", {})
    assert "Code: InvalidArgument" in result.stderr
    assert '"field":"agent_id"' in result.stderr.replace(" ", "")


def test_sigterm_stops_gracefully(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server.log")
    server.start()
    try:
        assert server.terminate() == 0
    finally:
        server.kill()
    assert "shutting down" in server.log()
    assert "stopped" in server.log()

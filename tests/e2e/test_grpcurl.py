"""Drive a real `orchestrator serve` process with the real grpcurl binary, as a user would."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from domain.identity import Role
from server.key_seeding import DEMO_KEYS
from tests.support.processes import BIN, ServerProcess

GRPCURL = str(BIN / "grpcurl")
# The documented demo keys `make run` seeds, by (tenant, role).
DEMO = {(key.tenant_id, key.role): key.api_key for key in DEMO_KEYS}


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
    server: ServerProcess,
    method: str,
    body: dict[str, object],
    tenant: str = "demo",
    role: Role = Role.CLIENT,
    package: str = "orchestrator.v1",
) -> subprocess.CompletedProcess[str]:
    """Call with the demo key of ``tenant`` and ``role``, as the README shows."""
    key = DEMO[(tenant, role)]
    flags = ("-H", f"authorization: Bearer {key}", "-d", json.dumps(body))
    return grpcurl(server, f"{package}.{method}", flags=flags)


def test_list_shows_the_services_health_and_reflection(served: ServerProcess) -> None:
    result = grpcurl(served, "list")
    assert result.returncode == 0, result.stderr
    services = set(result.stdout.split())
    assert {
        "orchestrator.v1.SessionService",
        "orchestrator.v1.ChatService",
        "orchestrator.v1.BatchService",
        "orchestrator.v1.TaskUpdateService",
        "orchestrator.admin.v1.AdminService",
        "orchestrator.internal.v1.PlatformService",
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


def test_without_a_key_calls_are_unauthenticated(served: ServerProcess) -> None:
    flags = ("-H", "x-tenant-id: demo", "-d", json.dumps({"agent_id": "a"}))
    result = grpcurl(served, "orchestrator.v1.SessionService/CreateSession", flags=flags)
    assert "Code: Unauthenticated" in result.stderr


def test_the_startup_log_lists_the_demo_keys_with_a_warning(served: ServerProcess) -> None:
    log = served.log()
    assert "local use only" in log
    assert all(key.api_key in log for key in DEMO_KEYS)


def test_admin_creates_a_key_that_works_then_revokes_it(served: ServerProcess) -> None:
    created = call(
        served,
        "AdminService/CreateApiKey",
        {"tenant_id": "demo", "role": "API_KEY_ROLE_CLIENT", "description": "e2e"},
        tenant="platform",
        role=Role.ADMIN,
        package="orchestrator.admin.v1",
    )
    assert created.returncode == 0, created.stderr
    reply = json.loads(created.stdout)
    flags = ("-H", f"authorization: Bearer {reply['api_key']}", "-d", '{"agent_id": "a"}')
    target = "orchestrator.v1.SessionService/CreateSession"
    assert grpcurl(served, target, flags=flags).returncode == 0
    revoked = call(
        served,
        "AdminService/RevokeApiKey",
        {"key_id": reply["key_id"]},
        tenant="platform",
        role=Role.ADMIN,
        package="orchestrator.admin.v1",
    )
    assert revoked.returncode == 0, revoked.stderr
    assert "Code: Unauthenticated" in grpcurl(served, target, flags=flags).stderr


def test_sigterm_stops_gracefully(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server.log")
    server.start()
    try:
        assert server.terminate() == 0
    finally:
        server.kill()
    assert "shutting down" in server.log()
    assert "stopped" in server.log()


def test_admin_reads_usage_and_tasks_as_the_readme_shows(served: ServerProcess) -> None:
    usage = call(
        served,
        "AdminService/GetTenantUsage",
        {"tenant_id": "demo", "start_date": "2026-01-01", "end_date": "2026-01-31"},
        tenant="platform",
        role=Role.ADMIN,
        package="orchestrator.admin.v1",
    )
    assert usage.returncode == 0, usage.stderr
    reply = json.loads(usage.stdout)
    assert (reply["start_date"], reply["end_date"]) == ("2026-01-01", "2026-01-31")
    missing = call(
        served,
        "AdminService/GetTask",
        {"tenant_id": "demo", "job_id": "0190a0b0-0000-7000-8000-000000000001"},
        tenant="platform",
        role=Role.ADMIN,
        package="orchestrator.admin.v1",
    )
    assert "NotFound" in missing.stderr


def verbose_sections(output: str) -> dict[str, str]:
    """``grpcurl -v`` output by section ("Response headers received", "Response trailers
    received", ...): the lines under each heading up to the next blank line."""
    sections: dict[str, str] = {}
    for block in output.split("\n\n"):
        heading, _, body = block.strip().partition("\n")
        sections[heading.rstrip(":")] = body
    return sections


def test_grpcurl_shows_a_unary_calls_request_id_in_its_trailers(served: ServerProcess) -> None:
    key = DEMO[("demo", Role.CLIENT)]
    flags: tuple[str, ...] = ("-v", "-H", f"authorization: Bearer {key}")
    flags = (*flags, "-H", "x-request-id: grpcurl-unary-1")
    flags = (*flags, "-d", json.dumps({"page_size": 1}))
    result = grpcurl(served, "orchestrator.v1.SessionService/ListSessions", flags=flags)
    assert result.returncode == 0, result.stderr
    sections = verbose_sections(result.stdout)
    assert "x-request-id: grpcurl-unary-1" in sections["Response trailers received"]
    assert "x-request-id" not in sections["Response headers received"]


def test_grpcurl_shows_a_streams_request_id_in_its_headers(served: ServerProcess) -> None:
    created = call(served, "SessionService/CreateSession", {"agent_id": "support-bot"})
    assert created.returncode == 0, created.stderr
    session_id = json.loads(created.stdout)["session"]["session_id"]
    key = DEMO[("demo", Role.CLIENT)]
    flags: tuple[str, ...] = ("-v", "-H", f"authorization: Bearer {key}")
    flags = (*flags, "-H", "x-request-id: grpcurl-stream-1")
    flags = (*flags, "-max-time", "2", "-d", json.dumps({"session_id": session_id}))
    # The session is idle: the stream stays open, with headers and no message, until -max-time.
    result = grpcurl(served, "orchestrator.v1.ChatService/StreamSession", flags=flags)
    sections = verbose_sections(result.stdout)
    assert "x-request-id: grpcurl-stream-1" in sections["Response headers received"], result

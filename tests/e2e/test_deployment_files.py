"""The deployment files: docker-compose.yml as Debian's `docker-compose config` resolves it
(Redis with AOF, two replicas, a worker, reference services reporting to both), the Dockerfile
(hashed lock files, no demo keys unless asked, a HEALTHCHECK that follows the configuration,
both run for real against `orchestrator serve`) and the Kubernetes example's probes."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from packaging.requirements import Requirement

from orchestrator.admin.v1 import admin_pb2, admin_pb2_grpc
from server.health import LIVENESS_SERVICE
from server.key_seeding import DEMO_KEYS
from tests.support.processes import BIN, ServerProcess
from tests.support.servers import bearer

ROOT = Path(__file__).resolve().parents[2]
ADMIN_KEY = "ao_composeadmin_" + "a" * 40
SERVICE_KEY = "ao_composeservice_" + "s" * 40
IMAGE = "agent-orchestrator:dev"
GRPC_PORT = 50051


# --- docker-compose.yml -----------------------------------------------------------------------


def compose_config(**env: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing: `make tools` installs Debian's docker-compose"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "COMPOSE_"))}
    return subprocess.run(
        [binary, "--file", str(ROOT / "docker-compose.yml"), "config"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The file as docker-compose resolves it, with both keys chosen."""
    resolved = compose_config(
        ORCH_BOOTSTRAP_ADMIN_KEY=ADMIN_KEY, ORCH_BOOTSTRAP_SERVICE_KEY=SERVICE_KEY
    )
    assert resolved.returncode == 0, resolved.stderr
    document: dict[str, Any] = yaml.safe_load(resolved.stdout)
    return document


def command(service: dict[str, Any]) -> list[str]:
    value = service.get("command") or []
    return shlex.split(value) if isinstance(value, str) else list(value)


def replicas(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run `orchestrator serve` (the image's default command)."""
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("image") == IMAGE and not service.get("entrypoint") and not command(service)
    }


def test_compose_file_is_valid_for_docker_compose(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= {"redis", "worker", "reference"}


def test_compose_refuses_to_start_without_chosen_keys() -> None:
    resolved = compose_config()
    assert resolved.returncode != 0
    assert "ORCH_BOOTSTRAP_ADMIN_KEY" in resolved.stderr


def test_compose_redis_keeps_an_append_only_file_on_a_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    args = command(redis)
    assert args[args.index("--appendonly") + 1] == "yes"
    assert any(str(volume).split(":")[1] == "/data" for volume in redis["volumes"])


def test_compose_runs_two_replicas_and_a_worker_on_one_redis(compose: dict[str, Any]) -> None:
    serving = replicas(compose)
    assert len(serving) == 2
    worker = compose["services"]["worker"]
    assert command(worker) == ["worker"]
    urls = {s["environment"]["REDIS_URL"] for s in [*serving.values(), worker]}
    assert urls == {"redis://redis:6379/0"}


def test_compose_reference_services_report_to_every_replica(compose: dict[str, Any]) -> None:
    reference = compose["services"]["reference"]["environment"]
    targets = set(reference["REF_ORCHESTRATOR_ADDRESS"].split(","))
    assert targets == {f"{name}:{GRPC_PORT}" for name in replicas(compose)}
    assert reference["REF_PUBLISH_API_KEY"] == SERVICE_KEY


def test_compose_replicas_reach_the_reference_services(compose: dict[str, Any]) -> None:
    port = compose["services"]["reference"]["environment"]["REF_LISTEN_ADDRESS"].split(":")[-1]
    for service in [*replicas(compose).values(), compose["services"]["worker"]]:
        downstream = {k: v for k, v in service["environment"].items() if k.endswith("_ADDRESS")}
        assert downstream["ORCH_QUERY_SERVICE_ADDRESS"] == f"reference:{port}"
        assert set(downstream.values()) == {f"reference:{port}"}


def test_compose_stores_the_chosen_keys_and_no_demo_keys(compose: dict[str, Any]) -> None:
    for service in [*replicas(compose).values(), compose["services"]["worker"]]:
        env = service["environment"]
        assert env["ORCH_BOOTSTRAP_ADMIN_KEY"] == ADMIN_KEY
        assert env["ORCH_BOOTSTRAP_SERVICE_KEY"] == SERVICE_KEY
        assert env.get("ORCH_DEMO_KEYS", "false") == "false"


# --- Dockerfile and lock files ----------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, args in final_stage():
        if op == "ENV":
            env.update(part.split("=", 1) for part in shlex.split(args))  # type: ignore[misc]
    return env


def healthcheck_command() -> list[str]:
    for op, args in final_stage():
        if op == "HEALTHCHECK":
            exec_form: list[str] = json.loads(args.split("CMD", 1)[1])
            return exec_form
    raise AssertionError("the image has no HEALTHCHECK")


def locked(path: Path) -> dict[str, str]:
    """name -> pinned version of a pip-compile lock file; every pin must carry a hash."""
    pins: dict[str, str] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", path.read_text()):
        match = re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", block)
        if match:
            assert "--hash=sha256:" in block, f"{match.group(1)} has no hash in {path.name}"
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def pip_installs() -> list[list[str]]:
    """The arguments after `pip install` of every such command the Dockerfile runs."""
    commands = [
        shlex.split(part)
        for op, args in dockerfile_instructions()
        if op == "RUN"
        for part in args.split("&&")
    ]
    return [c[2:] for c in commands if c[:2] == ["pip", "install"]]


def test_the_image_installs_its_dependencies_from_the_hashed_locks_only() -> None:
    installs = pip_installs()
    from_locks = {c[c.index("-r") + 1] for c in installs if "-r" in c and "--require-hashes" in c}
    assert from_locks == {"requirements.lock", "requirements-build.lock"}
    project = [c for c in installs if c[-1] == "."]
    assert project, "the project itself is installed"
    assert all("--no-deps" in c and "--no-build-isolation" in c for c in project)
    assert all("-r" in c or c[-1] == "." for c in installs), "nothing is installed unlocked"


def test_the_lock_pins_every_runtime_dependency_within_its_bounds() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = locked(ROOT / "requirements.lock")
    for spec in pyproject["project"]["dependencies"]:
        requirement = Requirement(spec)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} vs {spec}"


def test_the_build_backend_is_locked_within_its_bounds() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = locked(ROOT / "requirements-build.lock")
    for spec in pyproject["build-system"]["requires"]:
        requirement = Requirement(spec)
        assert requirement.specifier.contains(pins[requirement.name.lower()]), spec


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`orchestrator serve` with the image's environment (on a loopback port)."""
    env = {k: v for k, v in image_env().items() if k != "ORCH_LISTEN_ADDRESS"}
    server = ServerProcess(tmp_path_factory.mktemp("image") / "server.log", **env)
    server.start()
    yield server
    server.kill()


async def list_keys_with_the_demo_admin_key(address: str) -> Any:
    demo_admin = next(d for d in DEMO_KEYS if d.role.value == "admin")
    async with grpc.aio.insecure_channel(address) as channel:
        return await admin_pb2_grpc.AdminServiceStub(channel).ListApiKeys(
            admin_pb2.ListApiKeysRequest(tenant_id="demo"),
            metadata=(bearer(demo_admin.api_key),),
            timeout=10,
        )


def test_the_image_turns_the_demo_keys_off() -> None:
    assert image_env()["ORCH_DEMO_KEYS"] == "false"


async def test_a_server_with_the_image_environment_refuses_the_demo_keys(
    image_server: ServerProcess,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await list_keys_with_the_demo_admin_key(image_server.address)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_image_seeds_the_demo_keys_when_asked(tmp_path: Path) -> None:
    env = {k: v for k, v in image_env().items() if k != "ORCH_LISTEN_ADDRESS"}
    server = ServerProcess(tmp_path / "server.log", **{**env, "ORCH_DEMO_KEYS": "true"})
    server.start()
    try:
        await list_keys_with_the_demo_admin_key(server.address)
    finally:
        server.kill()


def test_the_image_healthcheck_probes_the_configured_listen_address(
    image_server: ServerProcess,
) -> None:
    args = healthcheck_command()
    assert "--address" not in args, "the HEALTHCHECK must follow ORCH_LISTEN_ADDRESS"
    env = {**os.environ, **image_env(), "ORCH_LISTEN_ADDRESS": f"0.0.0.0:{image_server.port}"}
    binary = BIN / args[0]
    assert binary.exists(), f"{args[0]} is not an installed command"
    probe = subprocess.run(
        [str(binary), *args[1:]], env=env, capture_output=True, text=True, check=False
    )
    assert (probe.returncode, probe.stdout.strip()) == (0, "SERVING"), probe.stderr


# --- Kubernetes -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def orchestrator_container() -> dict[str, Any]:
    documents = list(yaml.safe_load_all((ROOT / "deploy/kubernetes/orchestrator.yaml").read_text()))
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def grpc_port(container: dict[str, Any]) -> int:
    port: int = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    return port


def test_kubernetes_liveness_asks_the_entry_that_ignores_redis(
    orchestrator_container: dict[str, Any],
) -> None:
    probe = orchestrator_container["livenessProbe"]["grpc"]
    assert probe == {"port": grpc_port(orchestrator_container), "service": LIVENESS_SERVICE}


def test_kubernetes_readiness_asks_the_server_entry_that_follows_redis(
    orchestrator_container: dict[str, Any],
) -> None:
    probe = orchestrator_container["readinessProbe"]["grpc"]
    assert probe["port"] == grpc_port(orchestrator_container)
    assert probe.get("service", "") == ""


def test_kubernetes_takes_the_keys_from_a_secret(orchestrator_container: dict[str, Any]) -> None:
    env = {e["name"]: e for e in orchestrator_container["env"]}
    for name in ("REDIS_URL", "ORCH_BOOTSTRAP_ADMIN_KEY", "ORCH_BOOTSTRAP_SERVICE_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    assert "ORCH_DEMO_KEYS" not in env

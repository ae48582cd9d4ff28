"""`orchestrator health` without --address (the image's HEALTHCHECK) probes this host's server
as configured: the port of ORCH_LISTEN_ADDRESS on loopback, TLS when ORCH_TLS_CERT_FILE is set
(CA from ORCH_HEALTHCHECK_CA_FILE, else the served chain), a client certificate under mTLS.
Runs the real binary in a subprocess, with only the environment to go by."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.certs import Pki, make_pki
from tests.support.redis_process import free_port
from tests.support.servers import RunningServer, running_server, test_settings

ORCHESTRATOR = str(Path(sys.executable).parent / "orchestrator")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def health(*args: str, **env: str) -> tuple[int, str]:
    """Run `orchestrator health ARGS` with the ORCH_* variables ``env`` only."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    proc = await asyncio.create_subprocess_exec(
        ORCHESTRATOR,
        "health",
        "--timeout",
        "5",
        *args,
        env={**clean, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate()
    return proc.returncode or 0, output.decode()


@pytest.fixture
async def plain_server() -> AsyncIterator[RunningServer]:
    async with running_server(test_settings(None)) as running:
        yield running


async def test_it_probes_the_port_of_the_configured_listen_address(
    plain_server: RunningServer,
) -> None:
    code, output = await health(ORCH_LISTEN_ADDRESS=f"0.0.0.0:{plain_server.server.port}")
    assert (code, output.strip()) == (0, "SERVING")


async def test_it_fails_when_nothing_serves_the_configured_port(
    plain_server: RunningServer,
) -> None:
    code, output = await health(ORCH_LISTEN_ADDRESS=f"[::]:{free_port()}")
    assert code == 1
    assert "UNAVAILABLE" in output


async def test_it_probes_the_liveness_entry_when_asked(plain_server: RunningServer) -> None:
    address = f"0.0.0.0:{plain_server.server.port}"
    code, output = await health("--service", "liveness", ORCH_LISTEN_ADDRESS=address)
    assert (code, output.strip()) == (0, "SERVING")


async def test_it_speaks_tls_trusting_the_served_certificate_by_default(pki: Pki) -> None:
    tls = {"ORCH_TLS_CERT_FILE": str(pki.server_cert), "ORCH_TLS_KEY_FILE": str(pki.server_key)}
    async with running_server(test_settings(None, **_fields(tls))) as running:
        code, output = await health(ORCH_LISTEN_ADDRESS=f"[::]:{running.server.port}", **tls)
        assert (code, output.strip()) == (0, "SERVING")


async def test_it_verifies_the_server_against_the_configured_ca(pki: Pki, tmp_path: Path) -> None:
    stranger = make_pki(tmp_path)
    tls = {"ORCH_TLS_CERT_FILE": str(pki.server_cert), "ORCH_TLS_KEY_FILE": str(pki.server_key)}
    async with running_server(test_settings(None, **_fields(tls))) as running:
        address = f"0.0.0.0:{running.server.port}"
        code, _ = await health(
            ORCH_LISTEN_ADDRESS=address, ORCH_HEALTHCHECK_CA_FILE=str(stranger.ca_cert), **tls
        )
        assert code == 1, "a CA that did not sign the server certificate must not pass"
        code, output = await health(
            ORCH_LISTEN_ADDRESS=address, ORCH_HEALTHCHECK_CA_FILE=str(pki.ca_cert), **tls
        )
        assert (code, output.strip()) == (0, "SERVING")


async def test_it_presents_the_configured_client_certificate_under_mtls(pki: Pki) -> None:
    tls = {
        "ORCH_TLS_CERT_FILE": str(pki.server_cert),
        "ORCH_TLS_KEY_FILE": str(pki.server_key),
        "ORCH_TLS_CLIENT_CA_FILE": str(pki.ca_cert),
        "ORCH_HEALTHCHECK_CA_FILE": str(pki.ca_cert),
    }
    async with running_server(test_settings(None, **_fields(tls))) as running:
        address = f"0.0.0.0:{running.server.port}"
        code, _ = await health(ORCH_LISTEN_ADDRESS=address, **tls)
        assert code == 1, "mTLS refuses a probe without a client certificate"
        client = {
            "ORCH_HEALTHCHECK_CERT_FILE": str(pki.client_cert),
            "ORCH_HEALTHCHECK_KEY_FILE": str(pki.client_key),
        }
        code, output = await health(ORCH_LISTEN_ADDRESS=address, **tls, **client)
        assert (code, output.strip()) == (0, "SERVING")


async def test_it_verifies_the_configured_server_name(pki: Pki) -> None:
    tls = {
        "ORCH_TLS_CERT_FILE": str(pki.server_cert),
        "ORCH_TLS_KEY_FILE": str(pki.server_key),
        "ORCH_HEALTHCHECK_CA_FILE": str(pki.ca_cert),
    }
    async with running_server(test_settings(None, **_fields(tls))) as running:
        address = f"0.0.0.0:{running.server.port}"
        code, _ = await health(
            ORCH_LISTEN_ADDRESS=address, ORCH_HEALTHCHECK_SERVER_NAME="elsewhere.example", **tls
        )
        assert code == 1, "a name the certificate does not carry must fail verification"
        code, _ = await health(
            ORCH_LISTEN_ADDRESS=address, ORCH_HEALTHCHECK_SERVER_NAME="localhost", **tls
        )
        assert code == 0


async def test_a_bad_configuration_is_exit_code_2() -> None:
    code, output = await health(ORCH_LISTEN_ADDRESS="no-port")
    assert code == 2
    assert "listen_address" in output


def _fields(env: dict[str, str]) -> dict[str, str]:
    """The server settings of the ORCH_TLS_* variables in ``env``."""
    names = {
        "ORCH_TLS_CERT_FILE": "tls_cert_file",
        "ORCH_TLS_KEY_FILE": "tls_key_file",
        "ORCH_TLS_CLIENT_CA_FILE": "tls_client_ca_file",
    }
    return {names[k]: v for k, v in env.items() if k in names}

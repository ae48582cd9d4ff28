"""TLS and mutual TLS from certificate files in the settings, with certificates generated at
test time: TLS calls work, plaintext is refused, mTLS needs a client certificate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.v1 import session_pb2, session_pb2_grpc
from server.cli import main as cli_main
from server.config import SettingsError
from tests.support.certs import Pki, make_pki
from tests.support.servers import RunningServer, running_server, tenant, test_settings


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def tls_server(pki: Pki) -> AsyncIterator[RunningServer]:
    settings = test_settings(
        None, tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key)
    )
    async with running_server(settings) as running:
        yield running


@pytest.fixture
async def mtls_server(pki: Pki) -> AsyncIterator[RunningServer]:
    settings = test_settings(
        None,
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        tls_client_ca_file=str(pki.ca_cert),
    )
    async with running_server(settings) as running:
        yield running


def tls_channel(server: RunningServer, pki: Pki, *, client_cert: bool) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_cert.read_bytes(),
        private_key=pki.client_key.read_bytes() if client_cert else None,
        certificate_chain=pki.client_cert.read_bytes() if client_cert else None,
    )
    return grpc.aio.secure_channel(server.address, credentials)


async def create_session(channel: grpc.aio.Channel) -> session_pb2.Session:
    stub = session_pb2_grpc.SessionServiceStub(channel)
    reply = await stub.CreateSession(
        session_pb2.CreateSessionRequest(agent_id="a"), metadata=tenant("acme"), timeout=5
    )
    return reply.session


async def test_a_tls_call_works(tls_server: RunningServer, pki: Pki) -> None:
    async with tls_channel(tls_server, pki, client_cert=False) as channel:
        session = await create_session(channel)
    assert session.state == session_pb2.SESSION_STATE_ACTIVE


async def test_plaintext_is_refused_by_a_tls_server(tls_server: RunningServer) -> None:
    # running_server's own channel is plaintext.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create_session(tls_server.channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_a_client_without_a_certificate(
    mtls_server: RunningServer, pki: Pki
) -> None:
    async with tls_channel(mtls_server, pki, client_cert=False) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await create_session(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_accepts_a_client_with_a_certificate(
    mtls_server: RunningServer, pki: Pki
) -> None:
    async with tls_channel(mtls_server, pki, client_cert=True) as channel:
        session = await create_session(channel)
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert session.state == session_pb2.SESSION_STATE_ACTIVE
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_health_cli_speaks_mtls(mtls_server: RunningServer, pki: Pki) -> None:
    base = ["health", "--address", mtls_server.address, "--timeout", "3"]
    tls = ["--ca-file", str(pki.ca_cert)]
    client = ["--cert-file", str(pki.client_cert), "--key-file", str(pki.client_key)]
    # The CLI is synchronous (asyncio.run); run it in a worker thread, off this event loop.
    assert await asyncio.to_thread(cli_main, [*base, *tls, *client]) == 0
    assert await asyncio.to_thread(cli_main, [*base, *tls]) == 1
    assert await asyncio.to_thread(cli_main, base) == 1


def test_settings_need_the_certificate_and_key_together(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="together"):
        test_settings(None, tls_cert_file=str(tmp_path / "cert.pem"))
    with pytest.raises(SettingsError, match="ORCH_TLS_CLIENT_CA_FILE"):
        test_settings(None, tls_client_ca_file=str(tmp_path / "ca.pem"))

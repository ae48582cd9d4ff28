"""Typed errors with the request id and google.rpc details, retries after the server's
advertised delay, and TLS/mTLS settings from arguments or the environment."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import pytest

from aorkestra import AsyncClient, ClientConfig, ConfigError, RetryNotice, RetryPolicy
from aorkestra.errors import InvalidArgument, ResourceExhausted, Unauthenticated, Unavailable
from domain.identity import Role
from tests.support.certs import Pki, make_pki
from tests.support.keys import api_key_for
from tests.support.redis_process import free_port
from tests.support.servers import RunningServer, running_server, test_settings


@pytest.fixture
async def limited_server(backend_url: str | None) -> AsyncIterator[RunningServer]:
    """Tenant "limited" may make 2 calls at once, then one per second."""
    settings = test_settings(backend_url, rate_limit_overrides="limited=1:2")
    async with running_server(settings) as running:
        yield running


def limited_client(server: RunningServer, **options: object) -> AsyncClient:
    return AsyncClient(
        server.address,
        api_key=api_key_for("limited", Role.CLIENT),
        **options,  # type: ignore[arg-type]
    )


async def test_a_rate_limited_call_is_retried_after_the_advertised_delay(
    limited_server: RunningServer,
) -> None:
    notices: list[RetryNotice] = []
    async with limited_client(limited_server, on_retry=notices.append) as sdk:
        for _ in range(2):  # the burst
            await sdk.sessions.list()
        started = time.monotonic()
        page = await sdk.sessions.list()  # refused first, then retried and answered
        waited = time.monotonic() - started

    assert list(page.sessions) == []
    assert notices, "the refused call was not retried"
    first = notices[0]
    assert first.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert first.advertised
    advertised = first.error.retry_delay_s
    assert advertised is not None and advertised > 0
    assert first.delay_s >= advertised
    assert waited >= advertised
    assert [q.subject for q in first.error.details.quota_violations] == ["tenant:limited"]


async def test_a_delay_beyond_the_policy_raises_resource_exhausted_with_its_details(
    limited_server: RunningServer,
) -> None:
    policy = RetryPolicy(max_retry_delay_s=0.01)
    async with limited_client(limited_server, retry=policy) as sdk:
        for _ in range(2):
            await sdk.sessions.list()
        with pytest.raises(ResourceExhausted) as caught:
            await sdk.sessions.list()
    error = caught.value
    assert error.retry_delay_s is not None and error.retry_delay_s > 0
    assert error.details.quota_violations
    assert error.request_id


@pytest.mark.parametrize("where", ["initial", "trailing"])
async def test_the_request_id_is_read_from_headers_or_trailers(where: str) -> None:
    async with (
        running_server(test_settings(None, unary_request_id=where)) as running,
        AsyncClient(running.address, api_key=api_key_for("acme", Role.CLIENT)) as sdk,
    ):
        with pytest.raises(InvalidArgument) as caught:
            await sdk.sessions.create("")
    assert caught.value.request_id


async def test_a_bad_key_is_unauthenticated(limited_server: RunningServer) -> None:
    async with AsyncClient(limited_server.address, api_key="ao_nosuchkey_secret") as sdk:
        with pytest.raises(Unauthenticated):
            await sdk.sessions.list()


async def test_a_safe_call_to_an_unreachable_server_is_retried_then_raises_unavailable() -> None:
    notices: list[RetryNotice] = []
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
    async with AsyncClient(
        f"127.0.0.1:{free_port()}", api_key="k", retry=policy, timeout_s=2, on_retry=notices.append
    ) as sdk:
        with pytest.raises(Unavailable):
            await sdk.sessions.get("s")
    assert [n.attempt for n in notices] == [1, 2]


async def test_an_unsafe_call_is_not_retried_on_unavailable() -> None:
    notices: list[RetryNotice] = []
    async with AsyncClient(
        f"127.0.0.1:{free_port()}", api_key="k", timeout_s=2, on_retry=notices.append
    ) as sdk:
        with pytest.raises(Unavailable):
            await sdk.sessions.create("support-bot")
    assert notices == []


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def test_mtls_settings_come_from_the_environment(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = test_settings(
        None,
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        tls_client_ca_file=str(pki.ca_cert),
    )
    async with running_server(settings) as running:
        monkeypatch.setenv("AORKESTRA_ADDRESS", f"localhost:{running.server.port}")
        monkeypatch.setenv("AORKESTRA_API_KEY", api_key_for("acme", Role.CLIENT))
        monkeypatch.setenv("AORKESTRA_CA_FILE", str(pki.ca_cert))
        monkeypatch.setenv("AORKESTRA_CERT_FILE", str(pki.client_cert))
        monkeypatch.setenv("AORKESTRA_KEY_FILE", str(pki.client_key))
        async with AsyncClient() as sdk:
            assert sdk.config.tls
            session = await sdk.sessions.create("support-bot")
        assert session.session_id
        # Without the client certificate the handshake is refused.
        async with AsyncClient(
            cert_file="", key_file="", retry=RetryPolicy(max_attempts=1), timeout_s=3
        ) as no_cert:
            with pytest.raises(Unavailable):
                await no_cert.sessions.get(session.session_id)


async def test_tls_with_a_ca_from_arguments(pki: Pki) -> None:
    settings = test_settings(
        None, tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key)
    )
    async with (
        running_server(settings) as running,
        AsyncClient(
            running.address, api_key=api_key_for("acme", Role.CLIENT), ca_file=str(pki.ca_cert)
        ) as sdk,
    ):
        assert await sdk.health() == "SERVING"


def test_a_half_mtls_pair_is_a_config_error(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="both"):
        ClientConfig.resolve(cert_file=str(pki.client_cert), env={})


def test_arguments_win_over_the_environment() -> None:
    env = {"AORKESTRA_ADDRESS": "from-env:1", "AORKESTRA_API_KEY": "env-key", "AORKESTRA_TLS": "1"}
    config = ClientConfig.resolve(address="from-arg:2", tls=False, env=env)
    assert (config.address, config.api_key, config.tls) == ("from-arg:2", "env-key", False)

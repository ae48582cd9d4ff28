"""The start-up check of the addresses a server listens on."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from server.app import OrchestratorServer
from server.listen import ListenError, ensure_free
from tests.support.servers import test_settings


@pytest.fixture
def taken() -> Iterator[str]:
    """A loopback address a listening socket holds."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield f"127.0.0.1:{held.getsockname()[1]}"


def test_a_taken_address_names_the_setting(taken: str) -> None:
    with pytest.raises(
        ListenError, match=rf"cannot listen on {taken} \(ORCH_WS_ADDRESS\): .*in use"
    ):
        ensure_free(taken, "ORCH_WS_ADDRESS")


def test_port_zero_and_a_free_port_pass() -> None:
    ensure_free("127.0.0.1:0", "X")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    ensure_free(f"127.0.0.1:{free}", "X")


def test_the_server_checks_its_grpc_port(taken: str) -> None:
    server = OrchestratorServer(test_settings(None, listen_address=taken))
    with pytest.raises(ListenError, match="ORCH_LISTEN_ADDRESS"):
        server.check_addresses()


def test_a_shared_grpc_port_is_not_checked_with_so_reuseport(taken: str) -> None:
    server = OrchestratorServer(test_settings(None, listen_address=taken, so_reuseport=True))
    server.check_addresses()

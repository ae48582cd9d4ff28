"""A port the process must listen on, checked before anything binds it, so a busy port is one
clear line (``orchestrator serve`` exits with EXIT_ADDRESS_IN_USE) instead of a traceback."""

from __future__ import annotations

import errno
import socket

# The exit code of `orchestrator serve` when an address it must listen on is taken.
EXIT_ADDRESS_IN_USE = 3


class ListenError(RuntimeError):
    """An address this process must listen on cannot be bound."""


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` (IPv6 hosts in brackets; empty host: every interface)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ListenError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def ensure_free(address: str, setting: str) -> None:
    """Raise ListenError naming ``setting`` if ``address`` cannot be bound now (port 0 always
    can). The probe socket is closed at once; the real server binds it right after."""
    host, port = split_host_port(address)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {address} ({setting}): {exc.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            reason = (
                "the address is already in use (is another server running?)"
                if exc.errno == errno.EADDRINUSE
                else exc.strerror or str(exc)
            )
            raise ListenError(f"cannot listen on {address} ({setting}): {reason}") from None

"""Running real orchestrator servers inside the test's event loop."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc

from server.app import OrchestratorServer
from server.config import Settings


def test_settings(redis_url: str | None, **overrides: Any) -> Settings:
    """Settings for a server on a free loopback port with short timeouts."""
    base = Settings(
        listen_address="127.0.0.1:0",
        redis_url=redis_url,
        health_interval=0.2,
        shutdown_grace=1.0,
        redis_socket_timeout=1.0,
        redis_connect_timeout=0.5,
        metrics_address="127.0.0.1:0",
    )
    settings = dataclasses.replace(base, **overrides)
    settings.validate()
    return settings


test_settings.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@dataclasses.dataclass
class RunningServer:
    server: OrchestratorServer
    channel: grpc.aio.Channel

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@asynccontextmanager
async def running_server(settings: Settings, **server_args: Any) -> AsyncIterator[RunningServer]:
    """A started server (``server_args`` go to OrchestratorServer) and a channel to it."""
    server = OrchestratorServer(settings, **server_args)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield RunningServer(server, channel)
    finally:
        await channel.close(grace=None)
        await server.stop(grace=0.5)


def tenant(tenant_id: str, **extra: str) -> tuple[tuple[str, str], ...]:
    """Call metadata for a tenant (until API keys replace the header)."""
    return (("x-tenant-id", tenant_id), *extra.items())


def service(tenant_id: str = "platform", **extra: str) -> tuple[tuple[str, str], ...]:
    """Call metadata for a platform service publishing task updates."""
    return (("x-tenant-id", tenant_id), ("x-caller-role", "service"), *extra.items())

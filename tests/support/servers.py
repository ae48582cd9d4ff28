"""Running real orchestrator servers inside the test's event loop, and call metadata.

Authentication in tests: every call needs ``authorization: Bearer <api key>``. ``tenant(tid)``,
``service(tid)`` and ``admin(tid)`` return that header with a deterministic test key for the
tenant and role (tests.support.keys). ``running_server`` wraps the server's key store in
tests.support.keys.TestKeyStore, which accepts those keys for any tenant id on both backends, so
tests need no key setup: just pass ``metadata=tenant("acme")``. Keys created through AdminService
are real keys in the real store. ``orchestrator serve`` child processes (tests.support.processes)
do not know the test keys; they use the demo keys (server.key_seeding.DEMO_KEYS).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc

from domain.dispatch import Dispatcher
from domain.identity import Role
from registry.backend import open_backend
from server.app import OrchestratorServer
from server.backend_config import backend_config
from server.config import Settings
from tests.support.keys import TestKeyStore, api_key_for

# A server's stop takes its grace and a few round trips; one that takes longer than this is a
# hang (reported as an error of the test's teardown, not a suite that never ends).
STOP_BOUND_S = 60.0


def test_settings(redis_url: str | None, **overrides: Any) -> Settings:
    """Settings for a server on a free loopback port with short timeouts."""
    base = Settings(
        listen_address="127.0.0.1:0",
        redis_url=redis_url,
        health_interval=0.2,
        shutdown_grace=1.0,
        redis_socket_timeout=1.0,
        redis_connect_timeout=0.5,
        ws_address="127.0.0.1:0",
        reaper_interval=0.1,
        metrics_address="127.0.0.1:0",
        # The embedded batch worker is off unless a test turns it on (tests/batch does): it
        # costs every server stop up to one poll.
        batch_worker_enabled=False,
        batch_worker_poll=0.1,
        # No Agent Management in most tests: CreateSession takes any agent id unless a test
        # turns the check on (agent_check=True) and gives the server a platform answering it.
        agent_check=False,
        # ...and no Conversation or Tool Registry: a message is one call unless a test turns
        # plans on (plans=True) with a platform that answers them.
        plans=False,
        # ...and no downstream watch: most tests give the server no downstream to connect to.
        downstream_check_interval=0,
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
async def running_server(
    settings: Settings, *, dispatcher: Dispatcher | None = None, **server_args: Any
) -> AsyncIterator[RunningServer]:
    """A started server (``server_args`` go to OrchestratorServer) and a channel to it. The
    server accepts the deterministic test keys of tenant()/service()/admin()."""
    backend = open_backend(backend_config(settings))
    backend.api_keys = TestKeyStore(backend.api_keys)
    server = OrchestratorServer(settings, backend=backend, dispatcher=dispatcher, **server_args)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield RunningServer(server, channel)
    finally:
        async with asyncio.timeout(STOP_BOUND_S):
            await channel.close(grace=None)
            await server.stop(grace=0.5)


def bearer(api_key: str) -> tuple[str, str]:
    """The authorization header for an API key."""
    return ("authorization", f"Bearer {api_key}")


def tenant(tenant_id: str, **extra: str) -> tuple[tuple[str, str], ...]:
    """Call metadata for a client of ``tenant_id`` (Chat, Session, Batch services)."""
    return (bearer(api_key_for(tenant_id, Role.CLIENT)), *extra.items())


def service(tenant_id: str = "platform", **extra: str) -> tuple[tuple[str, str], ...]:
    """Call metadata for a platform service publishing task updates (TaskUpdateService)."""
    return (bearer(api_key_for(tenant_id, Role.SERVICE)), *extra.items())


def admin(tenant_id: str = "platform", **extra: str) -> tuple[tuple[str, str], ...]:
    """Call metadata for an operator (AdminService)."""
    return (bearer(api_key_for(tenant_id, Role.ADMIN)), *extra.items())

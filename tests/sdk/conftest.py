"""A real orchestrator (per backend) with the reference services reporting to it, for the SDK
and CLI tests; clients reach it through the SDK with the test keys."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from aorkestra import AsyncClient
from domain.identity import Role
from reference.app import ReferenceServices
from reference.config import ReferenceConfig
from tests.support.keys import api_key_for
from tests.support.redis_process import free_port
from tests.support.servers import RunningServer, running_server, service, test_settings


@dataclass
class Platform:
    running: RunningServer
    reference: ReferenceServices

    @property
    def address(self) -> str:
        return self.running.address

    def client(self, tenant_id: str = "acme", **options: Any) -> AsyncClient:
        """An SDK client of ``tenant_id`` (client role)."""
        return AsyncClient(self.address, api_key=api_key_for(tenant_id, Role.CLIENT), **options)

    def admin_client(self, **options: Any) -> AsyncClient:
        return AsyncClient(self.address, api_key=api_key_for("platform", Role.ADMIN), **options)


@asynccontextmanager
async def start_platform(
    backend_url: str | None, *, step_delay_s: float = 0.01, **settings: Any
) -> AsyncIterator[Platform]:
    orchestrator_port, reference_port = free_port(), free_port()
    config = test_settings(
        backend_url,
        listen_address=f"127.0.0.1:{orchestrator_port}",
        query_service_address=f"127.0.0.1:{reference_port}",
        embedding_service_address=f"127.0.0.1:{reference_port}",
        **settings,
    )
    reference = ReferenceServices(
        ReferenceConfig(
            listen_address=f"127.0.0.1:{reference_port}",
            orchestrator_address=f"127.0.0.1:{orchestrator_port}",
            step_delay_s=step_delay_s,
            publish_metadata=service(),
        )
    )
    async with running_server(config) as running:
        await reference.start()
        try:
            yield Platform(running, reference)
        finally:
            await reference.stop()


@pytest.fixture
async def platform(backend_url: str | None) -> AsyncIterator[Platform]:
    """A real server (once per backend) and the reference services reporting to it."""
    async with start_platform(backend_url) as started:
        yield started


@pytest.fixture
async def client(platform: Platform) -> AsyncIterator[AsyncClient]:
    """An SDK client of tenant "acme"."""
    async with platform.client() as sdk:
        yield sdk

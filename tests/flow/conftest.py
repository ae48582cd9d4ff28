"""Fixtures for the job flow: a real server per backend with a recording downstream."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.support.downstream import RecordingDispatcher
from tests.support.flow import Flow
from tests.support.servers import running_server, service, test_settings


@pytest.fixture
def flow_settings() -> dict[str, Any]:
    """Per-test settings overrides (override this fixture in a module to change them)."""
    return {}


@pytest.fixture
async def flow(backend_url: str | None, flow_settings: dict[str, Any]) -> AsyncIterator[Flow]:
    dispatcher = RecordingDispatcher()
    settings = dataclasses.replace(test_settings(backend_url), **flow_settings)
    async with running_server(settings, dispatcher=dispatcher) as running:
        yield Flow(running, dispatcher)


@pytest.fixture
async def ws(flow: Flow) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A service's socket on the flow server's WebSocket bridge."""
    url = f"http://127.0.0.1:{flow.running.server.ws_bridge.port}/ws/task_updates"
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(url, headers=dict(service())) as socket,
    ):
        yield socket

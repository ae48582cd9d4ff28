"""Batch fixtures: a real server per backend with a recording downstream (as tests/flow)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support.downstream import RecordingDispatcher
from tests.support.flow import Flow
from tests.support.servers import running_server, test_settings


@pytest.fixture
def flow_settings() -> dict[str, Any]:
    """Per-test settings overrides (override this fixture in a module to change them)."""
    return {
        "batch_worker_enabled": True,
        "batch_worker_concurrency": 32,
        "batch_expiry_interval": 0.05,
    }


@pytest.fixture
async def flow(backend_url: str | None, flow_settings: dict[str, Any]) -> AsyncIterator[Flow]:
    dispatcher = RecordingDispatcher()
    settings = dataclasses.replace(test_settings(backend_url), **flow_settings)
    async with running_server(settings, dispatcher=dispatcher) as running:
        yield Flow(running, dispatcher)

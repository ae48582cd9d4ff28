"""`make run`: the orchestrator with the reference platform services in the same process,
so a new user can chat end to end with nothing else running."""

from __future__ import annotations

import dataclasses
import logging

from reference.app import ReferenceServices
from reference.config import ReferenceConfig
from server.app import OrchestratorServer
from server.config import Settings
from server.signals import wait_for_stop_signal

log = logging.getLogger(__name__)


def _port(address: str) -> str:
    return address.rpartition(":")[2]


def reference_config(settings: Settings, orchestrator_port: int) -> ReferenceConfig:
    """REF_* settings, bound to the port the orchestrator expects the Query Service on and
    reporting back to this orchestrator."""
    base = ReferenceConfig.from_env()
    return dataclasses.replace(
        base,
        listen_address=f"127.0.0.1:{_port(settings.query_service_address)}",
        orchestrator_address=f"127.0.0.1:{orchestrator_port}",
    )


async def serve_with_reference(settings: Settings) -> None:
    """Run both until SIGTERM or SIGINT, then stop the reference services first."""
    server = OrchestratorServer(settings)
    await server.start()
    reference = ReferenceServices(reference_config(settings, server.port))
    await reference.start()
    log.info("reference platform services embedded on %s", reference.address)
    await wait_for_stop_signal()
    await reference.stop()
    await server.stop()

"""`make run`: the orchestrator with the reference platform services in the same process,
so a new user can chat end to end with nothing else running."""

from __future__ import annotations

import dataclasses
import logging

from domain.models import Service
from reference.app import ReferenceServices
from reference.config import DEFAULT_PUBLISH_METADATA, REFERENCE_SERVICES, ReferenceConfig
from server.app import OrchestratorServer
from server.config import Settings
from server.key_seeding import BOOTSTRAP_ADMIN_TENANT
from server.listen import ensure_free
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


async def with_publish_key(
    server: OrchestratorServer, config: ReferenceConfig
) -> tuple[ReferenceConfig, str | None]:
    """The embedded services report with REF_PUBLISH_API_KEY when it is set, else with the demo
    service key where the server seeded it (memory, ORCH_DEMO_KEYS). Elsewhere (REDIS_URL set)
    no store holds that key, so a service key is created for them, speaking for the services
    they run (REFERENCE_SERVICES): returns the config with it and its id (revoked at stop), or
    the config as it is and None."""
    demo_seeded = server.backend.name == "memory" and server.settings.demo_keys
    if config.publish_metadata != DEFAULT_PUBLISH_METADATA or demo_seeded:
        return config, None
    issued = await server.api_keys.create(
        BOOTSTRAP_ADMIN_TENANT,
        "service",
        "embedded reference services (make run)",
        [Service(name) for name in REFERENCE_SERVICES],
    )
    metadata = (("authorization", f"Bearer {issued.api_key}"),)
    return dataclasses.replace(config, publish_metadata=metadata), issued.record.key_id


async def serve_with_reference(settings: Settings) -> None:
    """Run both until SIGTERM or SIGINT, then stop the reference services first."""
    server = OrchestratorServer(settings)
    server.check_addresses()
    reference_address = reference_config(settings, 0).listen_address
    ensure_free(reference_address, "ORCH_QUERY_SERVICE_ADDRESS, the embedded reference services")
    await server.start()
    config, key_id = await with_publish_key(server, reference_config(settings, server.port))
    reference = ReferenceServices(config)
    await reference.start()
    log.info("reference platform services embedded on %s", reference.address)
    await wait_for_stop_signal()
    await reference.stop()
    if key_id is not None:
        await server.api_keys.revoke(key_id)
    await server.stop()

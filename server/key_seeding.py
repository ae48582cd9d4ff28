"""API keys the server stores at start: the demo keys and ORCH_API_KEYS_FILE (in-memory registry
only), ORCH_BOOTSTRAP_ADMIN_KEY and ORCH_BOOTSTRAP_SERVICE_KEY (any registry).

The keys file is JSON: ``{"keys": [ENTRY, ...]}`` where each ENTRY has ``tenant_id``, ``role``
(client, service or admin), an optional ``description``, for a service key an optional
``services`` list (the services it speaks for, e.g. ``["query", "embedding"]``; absent: a legacy
key that speaks for all), and either ``api_key`` (the plaintext ``ao_<key_id>_<secret>``, hashed
at load) or ``key_id`` plus ``secret_sha256`` (hex SHA-256 of the secret part).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domain.api_keys import (
    KEY_ID_PATTERN,
    ApiKeyManager,
    record_for_plaintext,
    validate_services,
)
from domain.errors import InvalidArgument, Unauthenticated
from domain.identity import Role
from domain.models import Service
from domain.ports.api_keys import ApiKey
from server.config import Settings, SettingsError

log = logging.getLogger(__name__)

BOOTSTRAP_ADMIN_TENANT = "platform"


@dataclass(frozen=True, slots=True)
class DemoKey:
    """A fixed, publicly documented key for trying the service locally; a service key names
    the services it speaks for."""

    api_key: str
    tenant_id: str
    role: Role
    description: str
    services: tuple[Service, ...] = field(default=())


# Documented in the README. Never use them outside a local `make run`.
DEMO_KEYS = (
    DemoKey("ao_democlient_local-demo-client-key-0001", "demo", Role.CLIENT, "demo client"),
    DemoKey("ao_otherclient_local-other-client-key-0001", "other", Role.CLIENT, "other tenant"),
    # The reference services `make run` embeds report with it: it speaks for all they run.
    DemoKey(
        "ao_demoservice_local-demo-service-key-0001",
        "platform",
        Role.SERVICE,
        "demo service",
        tuple(Service),
    ),
    DemoKey("ao_demoadmin_local-demo-admin-key-0001", "platform", Role.ADMIN, "demo admin"),
)


def _entry_record(entry: Any, where: str) -> ApiKey:
    if not isinstance(entry, dict):
        raise SettingsError(f"{where}: expected an object")
    try:
        tenant_id = str(entry["tenant_id"])
        role = Role(entry["role"])
        description = str(entry.get("description", ""))
        services = _entry_services(entry.get("services", []))
        if "api_key" in entry:
            return record_for_plaintext(
                str(entry["api_key"]), tenant_id, role, description, services
            )
        key_id, digest = str(entry["key_id"]), str(entry["secret_sha256"]).lower()
        spoken = validate_services(role, services)
    except KeyError as exc:
        raise SettingsError(f"{where}: missing {exc.args[0]!r}") from None
    # A bad role or services list; InvalidArgument is a DomainError, not a ValueError.
    except ValueError as exc:
        raise SettingsError(f"{where}: {exc}") from None
    except InvalidArgument as exc:
        raise SettingsError(f"{where}: {exc.message}") from None
    if not KEY_ID_PATTERN.match(key_id):
        raise SettingsError(f"{where}: key_id must be 4-160 letters or digits")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise SettingsError(f"{where}: secret_sha256 must be 64 hex digits")
    return ApiKey(key_id, tenant_id, role, description, digest, services=spoken)


def _entry_services(value: Any) -> list[Service | None]:
    """A keys-file entry's ``services``: a list of service names (unknown ones become None,
    which validate_services refuses naming the entry); ValueError when it is not a list."""
    if not isinstance(value, list):
        raise ValueError("services must be a list of service names")
    known = {service.value: service for service in Service}
    return [known.get(name) if isinstance(name, str) else None for name in value]


def load_keys_file(path: str) -> list[ApiKey]:
    """The key records in an ORCH_API_KEYS_FILE; SettingsError when it cannot be used."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SettingsError(f"ORCH_API_KEYS_FILE={path}: {exc}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise SettingsError(f'ORCH_API_KEYS_FILE={path}: expected {{"keys": [...]}}')
    return [
        _entry_record(entry, f"ORCH_API_KEYS_FILE {path} keys[{i}]")
        for i, entry in enumerate(entries)
    ]


async def warn_without_keys(settings: Settings, keys: ApiKeyManager, *, in_memory: bool) -> bool:
    """On a shared registry (Redis) started without ORCH_BOOTSTRAP_ADMIN_KEY: log a warning when
    tenant ``platform`` holds no live key (among its first 50), so nobody can create keys (the
    demo keys are in-memory only). Returns whether it warned."""
    if in_memory or settings.bootstrap_admin_key:
        return False
    page = await keys.list(BOOTSTRAP_ADMIN_TENANT, 50, "")
    if any(not key.revoked for key in page.items):
        return False
    log.warning(
        "no API key of tenant %s in this registry and ORCH_BOOTSTRAP_ADMIN_KEY is not set: "
        "calls will be refused (the demo keys exist only in the in-memory registry). Start "
        "once with ORCH_BOOTSTRAP_ADMIN_KEY=ao_<key_id>_<secret> and create keys with "
        "AdminService/CreateApiKey",
        BOOTSTRAP_ADMIN_TENANT,
    )
    return True


async def seed_keys(settings: Settings, keys: ApiKeyManager, *, in_memory: bool) -> None:
    """Store the configured keys; an id that exists already is left as it is."""
    if in_memory and settings.demo_keys:
        for demo in DEMO_KEYS:
            await keys.ensure(
                record_for_plaintext(
                    demo.api_key, demo.tenant_id, demo.role, demo.description, demo.services
                )
            )
        log.warning(
            "demo API keys are active (set ORCH_DEMO_KEYS=false to disable); they are public, "
            "for local use only:\n%s",
            "\n".join(
                f"  {d.role.value:8} tenant {d.tenant_id:9} authorization: Bearer {d.api_key}"
                + (f" (speaks for {', '.join(s.value for s in d.services)})" if d.services else "")
                for d in DEMO_KEYS
            ),
        )
    if in_memory and settings.api_keys_file:
        records = load_keys_file(settings.api_keys_file)
        for record in records:
            await keys.ensure(record)
        log.info("loaded %d API keys from %s", len(records), settings.api_keys_file)
    bootstrap = (
        ("ORCH_BOOTSTRAP_ADMIN_KEY", settings.bootstrap_admin_key, Role.ADMIN, "bootstrap admin"),
        (
            "ORCH_BOOTSTRAP_SERVICE_KEY",
            settings.bootstrap_service_key,
            Role.SERVICE,
            "bootstrap service",
        ),
    )
    for variable, api_key, role, description in bootstrap:
        if api_key:
            await _store_bootstrap_key(keys, variable, api_key, role, description)


async def _store_bootstrap_key(
    keys: ApiKeyManager, variable: str, api_key: str, role: Role, description: str
) -> None:
    """Store a key of tenant ``BOOTSTRAP_ADMIN_TENANT`` unless its id exists (then warn when
    the stored one has another secret or is revoked)."""
    record = record_for_plaintext(api_key, BOOTSTRAP_ADMIN_TENANT, role, description)
    if await keys.ensure(record):
        log.info("stored the %s key %s", description, record.key_id)
        return
    try:
        await keys.verify(api_key)
    except Unauthenticated:
        log.warning(
            "%s: key %s exists with another secret or is revoked; it was left as it is",
            variable,
            record.key_id,
        )

"""API keys the server stores at start: the demo keys and ORCH_API_KEYS_FILE (in-memory registry
only) and ORCH_BOOTSTRAP_ADMIN_KEY (any registry).

The keys file is JSON: ``{"keys": [ENTRY, ...]}`` where each ENTRY has ``tenant_id``, ``role``
(client, service or admin), an optional ``description``, and either ``api_key`` (the plaintext
``ao_<key_id>_<secret>``, hashed at load) or ``key_id`` plus ``secret_sha256`` (hex SHA-256 of
the secret part).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domain.api_keys import KEY_ID_PATTERN, ApiKeyManager, record_for_plaintext
from domain.errors import InvalidArgument, Unauthenticated
from domain.identity import Role
from domain.ports.api_keys import ApiKey
from server.config import Settings, SettingsError

log = logging.getLogger(__name__)

BOOTSTRAP_ADMIN_TENANT = "platform"


@dataclass(frozen=True, slots=True)
class DemoKey:
    """A fixed, publicly documented key for trying the service locally."""

    api_key: str
    tenant_id: str
    role: Role
    description: str


# Documented in the README. Never use them outside a local `make run`.
DEMO_KEYS = (
    DemoKey("ao_democlient_local-demo-client-key-0001", "demo", Role.CLIENT, "demo client"),
    DemoKey("ao_otherclient_local-other-client-key-0001", "other", Role.CLIENT, "other tenant"),
    DemoKey("ao_demoservice_local-demo-service-key-0001", "platform", Role.SERVICE, "demo service"),
    DemoKey("ao_demoadmin_local-demo-admin-key-0001", "platform", Role.ADMIN, "demo admin"),
)


def _entry_record(entry: Any, where: str) -> ApiKey:
    if not isinstance(entry, dict):
        raise SettingsError(f"{where}: expected an object")
    try:
        tenant_id = str(entry["tenant_id"])
        role = Role(entry["role"])
        description = str(entry.get("description", ""))
        if "api_key" in entry:
            return record_for_plaintext(str(entry["api_key"]), tenant_id, role, description)
        key_id, digest = str(entry["key_id"]), str(entry["secret_sha256"]).lower()
    except KeyError as exc:
        raise SettingsError(f"{where}: missing {exc.args[0]!r}") from None
    except ValueError as exc:  # a bad role; InvalidArgument is a DomainError, not a ValueError
        raise SettingsError(f"{where}: {exc}") from None
    except InvalidArgument as exc:
        raise SettingsError(f"{where}: {exc.message}") from None
    if not KEY_ID_PATTERN.match(key_id):
        raise SettingsError(f"{where}: key_id must be 4-160 letters or digits")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise SettingsError(f"{where}: secret_sha256 must be 64 hex digits")
    return ApiKey(key_id, tenant_id, role, description, digest)


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
                record_for_plaintext(demo.api_key, demo.tenant_id, demo.role, demo.description)
            )
        log.warning(
            "demo API keys are active (set ORCH_DEMO_KEYS=false to disable); they are public, "
            "for local use only:\n%s",
            "\n".join(
                f"  {d.role.value:8} tenant {d.tenant_id:9} authorization: Bearer {d.api_key}"
                for d in DEMO_KEYS
            ),
        )
    if in_memory and settings.api_keys_file:
        records = load_keys_file(settings.api_keys_file)
        for record in records:
            await keys.ensure(record)
        log.info("loaded %d API keys from %s", len(records), settings.api_keys_file)
    if settings.bootstrap_admin_key:
        record = record_for_plaintext(
            settings.bootstrap_admin_key, BOOTSTRAP_ADMIN_TENANT, Role.ADMIN, "bootstrap admin"
        )
        if await keys.ensure(record):
            log.info("stored the bootstrap admin key %s", record.key_id)
            return
        try:
            await keys.verify(settings.bootstrap_admin_key)
        except Unauthenticated:
            log.warning(
                "ORCH_BOOTSTRAP_ADMIN_KEY: key %s exists with another secret or is revoked; "
                "it was left as it is",
                record.key_id,
            )

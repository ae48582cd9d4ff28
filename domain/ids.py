"""Identifier generation and validation, and the opaque page tokens that carry them."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from domain.errors import InvalidArgument

# Tenant ids end up inside Redis hash tags, so braces and separators are not allowed.
TENANT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Ids the orchestrator hands out (uuid7 in canonical form).
RESOURCE_ID_PATTERN = re.compile(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
)


_last_ms = 0
_counter = 0


def new_id() -> str:
    """A UUIDv7 string: its first 48 bits are the Unix time in ms and the next 12 a counter
    (RFC 9562 method 1), so ids from one process sort in creation order, even within a ms."""
    global _last_ms, _counter
    ms = time.time_ns() // 1_000_000
    if ms > _last_ms:
        _last_ms, _counter = ms, int.from_bytes(os.urandom(2), "big") & 0x3FF
    else:  # same ms (or the clock stepped back): keep counting within the last ms
        _counter += 1
        if _counter > 0xFFF:
            _last_ms, _counter = _last_ms + 1, 0
        ms = _last_ms
    rand_b = int.from_bytes(os.urandom(8), "big") & 0x3FFF_FFFF_FFFF_FFFF
    value = (ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76  # version
    value |= _counter << 64  # rand_a: the monotonic counter
    value |= 0b10 << 62  # variant
    value |= rand_b
    return str(uuid.UUID(int=value))


def derived_id(parent_id: str, name: str) -> str:
    """A resource id (UUIDv7 shape, so it passes :func:`is_resource_id`) determined by
    ``parent_id`` and ``name`` alone: the same pair always gives the same id. Work that is
    delivered more than once (a batch item) names its job this way, so a redelivery finds the
    job an earlier delivery started. The time bits are the parent's (a UUIDv7 this service
    issued; 0 otherwise), the other 74 bits come from a SHA-256 of both."""
    digest = hashlib.sha256(f"{parent_id}/{name}".encode()).digest()
    bits = int.from_bytes(digest[:10], "big")  # 80 bits, 74 used
    ms = int(parent_id[:8] + parent_id[9:13], 16) if is_resource_id(parent_id) else 0
    value = (ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76  # version
    value |= ((bits >> 62) & 0xFFF) << 64
    value |= 0b10 << 62  # variant
    value |= bits & 0x3FFF_FFFF_FFFF_FFFF
    return str(uuid.UUID(int=value))


def is_resource_id(value: str) -> bool:
    """Whether ``value`` has the shape of an id this service issues."""
    return bool(RESOURCE_ID_PATTERN.match(value))


def require_id(
    value: str, field: str, what: str, valid: Callable[[str], bool] = is_resource_id
) -> str:
    """``value`` when present and ``valid``; else INVALID_ARGUMENT naming ``field`` (``what``
    names the kind of id in the message: "is not a valid <what>")."""
    if not value:
        raise InvalidArgument.field(field, "is required")
    if not valid(value):
        raise InvalidArgument.field(field, f"is not a valid {what}")
    return value


def seal_page_token(payload: Mapping[str, Any]) -> str:
    """An opaque page token carrying ``payload`` (JSON in unpadded URL-safe base64)."""
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


def open_page_token(token: str, *keys: str) -> tuple[Any, ...]:
    """The values under ``keys`` of the payload ``seal_page_token`` put in ``token``;
    INVALID_ARGUMENT on page_token for anything else (the caller checks the values)."""
    try:
        padded = token + "=" * (-len(token) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded.encode()))
        return tuple(payload[key] for key in keys)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidArgument.field("page_token", "is not a valid page token") from None


def tenant_entries(raw: str, shape: str) -> Iterator[tuple[str, str, str]]:
    """The entries of a per-tenant setting ``tenantA=...,tenantB=...`` as (tenant, value,
    entry); ValueError naming the ``shape`` expected (``tenant=tokens``) for a bad entry."""
    for entry in (part.strip() for part in raw.split(",")):
        if not entry:
            continue
        tenant, sep, value = entry.partition("=")
        tenant = tenant.strip()
        if not sep or not is_tenant_id(tenant):
            raise ValueError(f"expected {shape}, got {entry!r}")
        yield tenant, value, entry


def is_tenant_id(value: str) -> bool:
    """Whether ``value`` is an acceptable tenant id."""
    return bool(TENANT_ID_PATTERN.match(value))


def require_tenant_id(value: str) -> str:
    """Validate a tenant id argument (the admin APIs name the tenant they act on)."""
    return require_id(value, "tenant_id", "tenant id", is_tenant_id)

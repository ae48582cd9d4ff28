"""API keys: format, hashing, validation and the create/list/revoke/verify rules.

A key reads ``ao_<key_id>_<secret>``. The key id is public (it names the key in listings, logs
and the admin API); the secret is 32 random bytes, urlsafe base64, shown once at creation. Only
the SHA-256 of the secret is stored; verification compares digests in constant time. A secret
carries 256 random bits, so a plain hash needs no salt or stretching.

``verify`` reads the key's record from the store on every call. What it remembers per process
is only a pure function of the presented text, its key id and secret digest, so a live key is
not parsed and hashed again. The gRPC edge verifies a key once per process and then checks its
standing (revoked or gone) with the caller's rate, in the rate limiter's one step
(server.auth.Authenticator, domain.ports.rate_limits), so a revocation still takes effect on
every replica at the key's next call.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from domain.errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated
from domain.identity import Role
from domain.ids import is_tenant_id
from domain.models import Page, Service, page_limit
from domain.ports.api_keys import ApiKey, ApiKeyStore

KEY_PREFIX = "ao_"
KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9]{4,160}$")
SECRET_PATTERN = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
SECRET_BYTES = 32
KEY_ID_BYTES = 8
MAX_DESCRIPTION_CHARS = 256
CREATE_ATTEMPTS = 3
# Presented keys whose id and digest verify remembers; past this many the memo starts over.
MAX_REMEMBERED_DIGESTS = 10_000


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A newly created key: the plaintext is returned to the creator once and never stored."""

    api_key: str
    record: ApiKey


def hash_secret(secret: str) -> str:
    """Hex SHA-256 of a key secret: the only form in which secrets are stored."""
    return hashlib.sha256(secret.encode()).hexdigest()


def format_key(key_id: str, secret: str) -> str:
    return f"{KEY_PREFIX}{key_id}_{secret}"


def parse_key(api_key: str) -> tuple[str, str]:
    """Split ``ao_<key_id>_<secret>``; Unauthenticated when it is not shaped like a key."""
    if not api_key.startswith(KEY_PREFIX):
        raise Unauthenticated("malformed API key")
    key_id, sep, secret = api_key[len(KEY_PREFIX) :].partition("_")
    if not sep or not KEY_ID_PATTERN.match(key_id) or not SECRET_PATTERN.match(secret):
        raise Unauthenticated("malformed API key")
    return key_id, secret


def new_key(
    tenant_id: str, role: Role, description: str, services: frozenset[Service] = frozenset()
) -> IssuedKey:
    """Generate a key with a random id and secret (not yet stored)."""
    key_id = secrets.token_hex(KEY_ID_BYTES)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    record = ApiKey(
        key_id=key_id,
        tenant_id=tenant_id,
        role=role,
        description=description,
        secret_sha256=hash_secret(secret),
        services=services,
    )
    return IssuedKey(format_key(key_id, secret), record)


def record_for_plaintext(
    api_key: str,
    tenant_id: str,
    role: Role,
    description: str,
    services: Sequence[Service | None] = (),
) -> ApiKey:
    """The stored record for a key given in plaintext (configuration files, bootstrap keys)."""
    try:
        key_id, secret = parse_key(api_key)
    except Unauthenticated:
        raise InvalidArgument.field("api_key", "must look like ao_<key_id>_<secret>") from None
    validate_owner(tenant_id, role.value, description)
    spoken = validate_services(role, services)
    return ApiKey(key_id, tenant_id, role, description, hash_secret(secret), services=spoken)


def validate_services(role: Role, services: Sequence[Service | None]) -> frozenset[Service]:
    """The services a key speaks for, as given at creation: only a service key lists any,
    each known service at most once (None stands for an unspecified or unknown one). Empty
    means a legacy service key that speaks for every service. The list is bounded by the
    enum: a longer one must repeat a service."""
    if services and role is not Role.SERVICE:
        raise InvalidArgument.field(
            "services", f"only a service key speaks for services, not a {role.value} key"
        )
    seen: set[Service] = set()
    for index, service in enumerate(services):
        if service is None:
            raise InvalidArgument.field(f"services[{index}]", "must be a known service")
        if service in seen:
            raise InvalidArgument.field(f"services[{index}]", f"{service.value} is listed twice")
        seen.add(service)
    return frozenset(seen)


def validate_owner(tenant_id: str, role: str, description: str) -> Role:
    """Check the fields a key is created with; returns the parsed role."""
    if not tenant_id:
        raise InvalidArgument.field("tenant_id", "is required")
    if not is_tenant_id(tenant_id):
        raise InvalidArgument.field(
            "tenant_id", "must be 1-64 letters, digits, '.', '_' or '-', starting alphanumeric"
        )
    try:
        parsed = Role(role)
    except ValueError:
        raise InvalidArgument.field("role", "must be client, service or admin") from None
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise InvalidArgument.field(
            "description", f"must be at most {MAX_DESCRIPTION_CHARS} characters"
        )
    return parsed


def encode_page_token(tenant_id: str, after: str) -> str:
    payload = json.dumps({"t": tenant_id, "after": after}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode_page_token(tenant_id: str, token: str) -> str:
    """The key id to continue after; InvalidArgument for a forged or foreign token."""
    try:
        padded = token + "=" * (-len(token) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded.encode()))
        after = payload["after"]
        owner = payload["t"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidArgument.field("page_token", "is not a valid page token") from None
    if not isinstance(after, str) or not KEY_ID_PATTERN.match(after) or owner != tenant_id:
        raise InvalidArgument.field("page_token", "is not a valid page token for this tenant")
    return after


class ApiKeyManager:
    """Creates, lists, revokes and verifies keys over an ApiKeyStore."""

    def __init__(self, store: ApiKeyStore) -> None:
        self._store = store
        # Presented key text -> (key id, SHA-256 of its secret), for keys that verified. Both
        # follow from the text alone, so this never goes stale; the record (revocation included)
        # is still read from the store on every call. Only verified keys are kept, so guessing
        # cannot fill it.
        self._digests: dict[str, tuple[str, str]] = {}

    async def create(
        self,
        tenant_id: str,
        role: str,
        description: str,
        services: Sequence[Service | None] = (),
    ) -> IssuedKey:
        """A new key for ``tenant_id`` with ``role``; the plaintext is in the result only.
        ``services``: what a service key speaks for (validate_services)."""
        parsed = validate_owner(tenant_id, role, description)
        spoken = validate_services(parsed, services)
        for _ in range(CREATE_ATTEMPTS):  # a 64-bit random id practically never collides
            issued = new_key(tenant_id, parsed, description, spoken)
            stored = await self._store.add_key(issued.record)
            if stored is not None:
                return IssuedKey(issued.api_key, stored)
        raise AlreadyExists("could not pick an unused key id; try again")

    async def ensure(self, record: ApiKey) -> bool:
        """Store a configured key unless its id exists; returns whether it was added."""
        return await self._store.add_key(record) is not None

    async def list(self, tenant_id: str, page_size: int, page_token: str) -> Page[ApiKey]:
        """The tenant's keys (revoked ones included) in key id order, one page at a time."""
        validate_owner(tenant_id, Role.CLIENT.value, "")
        limit = page_limit(page_size)
        after = decode_page_token(tenant_id, page_token) if page_token else None
        page = await self._store.list_keys(tenant_id, limit=limit, after=after)
        token = encode_page_token(tenant_id, page.next_cursor) if page.next_cursor else None
        return Page(page.items, token)

    async def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key for good (idempotent); NotFound for an unknown id."""
        if not key_id:
            raise InvalidArgument.field("key_id", "is required")
        if not KEY_ID_PATTERN.match(key_id):
            raise InvalidArgument.field("key_id", "is not a valid key id")
        revoked = await self._store.revoke_key(key_id)
        if revoked is None:
            raise NotFound(f"API key {key_id} not found")
        return revoked

    async def revoked_among(self, key_ids: Collection[str]) -> set[str]:
        """Which of these key ids are revoked now, in one read of the store. A key missing
        from the store is not counted: only a revocation ends what a key has open (a store
        that lost its data is a matter for the health probe, not a reason to cut streams)."""
        ids = sorted(key_ids)
        records = await self._store.get_keys(ids)
        return {record.key_id for record in records if record is not None and record.revoked}

    async def verify(self, api_key: str) -> ApiKey:
        """The live record of a presented key; Unauthenticated when unknown, wrong or revoked.
        The message never says which, so it does not help guessing."""
        remembered = self._digests.get(api_key)
        if remembered is None:
            key_id, secret = parse_key(api_key)
            presented = hash_secret(secret)
        else:
            key_id, presented = remembered
        record = await self._store.get_key(key_id)
        expected = record.secret_sha256 if record is not None else hash_secret("")
        matches = hmac.compare_digest(presented, expected)
        if record is None or not matches or record.revoked:
            self._digests.pop(api_key, None)
            raise Unauthenticated("invalid or revoked API key")
        if remembered is None:
            if len(self._digests) >= MAX_REMEMBERED_DIGESTS:
                self._digests.clear()
            self._digests[api_key] = (key_id, presented)
        return record

"""Authentication and roles: who a bearer API key identifies, and what that role may call.

``authenticate_bearer`` turns an ``authorization`` header value into a Caller; the gRPC
edge (server.edge) and the WebSocket bridge both use it. Failures are domain
errors: Unauthenticated for a missing, malformed, unknown or revoked key, Unavailable when the
key store cannot be reached. ``authorize`` raises PermissionDenied for the wrong role.
"""

from __future__ import annotations

from domain.api_keys import ApiKeyManager
from domain.errors import PermissionDenied, Unauthenticated
from domain.identity import Caller, Role
from domain.ports.api_keys import ApiKey

AUTHORIZATION_HEADER = "authorization"
# Headers whose Caller the Authenticator remembers; past this many it starts over.
MAX_KNOWN_HEADERS = 10_000

PUBLIC_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
# The role each service family requires, by method prefix; first match wins.
METHOD_ROLES: tuple[tuple[str, Role], ...] = (
    ("/orchestrator.v1.TaskUpdateService/", Role.SERVICE),
    ("/orchestrator.internal.v1.", Role.SERVICE),
    ("/orchestrator.admin.v1.", Role.ADMIN),
    ("/orchestrator.v1.", Role.CLIENT),
)


def required_role(method: str) -> Role | None:
    """The role a method needs, or None for public methods (health, reflection). Methods of
    unknown services need ADMIN, the narrowest role."""
    if method.startswith(PUBLIC_PREFIXES):
        return None
    for prefix, role in METHOD_ROLES:
        if method.startswith(prefix):
            return role
    return Role.ADMIN


def bearer_token(header_value: str | None) -> str:
    """The API key in ``Bearer <api key>``; Unauthenticated when missing or another scheme."""
    if not header_value or not header_value.strip():
        raise Unauthenticated("missing authorization header: send 'Bearer <api key>'")
    scheme, _, token = header_value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("the authorization header must be 'Bearer <api key>'")
    return token


async def authenticate_bearer(header_value: str | None, keys: ApiKeyManager) -> Caller:
    """The Caller an ``authorization`` header value identifies (tenant, role and, for a
    service key, the services it speaks for, all from the key)."""
    record = await keys.verify(bearer_token(header_value))
    return Caller(record.tenant_id, record.role, record.key_id, record.services)


def authorize(caller: Caller, needed: Role) -> None:
    """PermissionDenied unless the caller has exactly the role the method needs."""
    if caller.role is not needed:
        raise wrong_role(caller, needed)


def wrong_role(caller: Caller, needed: Role) -> PermissionDenied:
    return PermissionDenied(
        f"this method needs an API key with the {needed.value} role, "
        f"the key {caller.key_id} has the {caller.role.value} role"
    )


# The key ids of the public demo keys (server.key_seeding), which only the in-memory registry
# seeds; a refusal of one of them elsewhere says why.
DEMO_KEY_IDS = frozenset({"democlient", "otherclient", "demoservice", "demoadmin"})
DEMO_KEY_HINT = (
    "the demo keys exist only in the in-memory registry (no REDIS_URL); with Redis, start the "
    "server once with ORCH_BOOTSTRAP_ADMIN_KEY=ao_<key_id>_<secret> and create keys with "
    "orchestrator.admin.v1.AdminService/CreateApiKey"
)


class Authenticator:
    """authenticate_bearer bound to one key store: what the edge and the WebSocket bridge hold
    (``OrchestratorServer.authenticator``). With ``demo_key_hint`` (a store that never holds
    the demo keys) a refused demo key's message says where keys come from.

    It remembers the Caller of every ``authorization`` header whose key verified (``known``),
    so the edge need not read the key's record again: it checks the key's standing (revoked or
    gone) in the same step as the caller's rate instead (server.edge_limits, one round trip on
    Redis) and ``forget``s a header whose key is no longer live. A key's tenant, role and
    services never change after it is created; only its revocation does. Only keys that
    verified are remembered, so guessing cannot fill the memo."""

    def __init__(self, keys: ApiKeyManager, *, demo_key_hint: bool = False) -> None:
        self.keys = keys
        self._demo_key_hint = demo_key_hint
        self._known: dict[str, Caller] = {}

    async def _verify(self, api_key: str) -> ApiKey:
        try:
            return await self.keys.verify(api_key)
        except Unauthenticated as exc:
            parts = api_key.split("_", 2)
            if self._demo_key_hint and len(parts) == 3 and parts[1] in DEMO_KEY_IDS:
                raise Unauthenticated(f"{exc.message}: {DEMO_KEY_HINT}") from None
            raise

    def known(self, header_value: str | None) -> Caller | None:
        """The Caller of a header whose key verified in this process, or None (no I/O; the
        key's standing is the caller's to check)."""
        return self._known.get(header_value) if header_value is not None else None

    def forget(self, header_value: str) -> None:
        self._known.pop(header_value, None)

    async def authenticate_bearer(self, header_value: str | None) -> Caller:
        record = await self._verify(bearer_token(header_value))
        return Caller(record.tenant_id, record.role, record.key_id, record.services)

    async def authenticate_header(self, header_value: str | None, needed: Role) -> Caller:
        """The authorized Caller for an ``authorization`` header value, its key read from the
        store; remembered for ``known`` once the key verified."""
        record = await self._verify(bearer_token(header_value))
        # Positional: a third cheaper than keywords.
        caller = Caller(record.tenant_id, record.role, record.key_id, record.services)
        if header_value is not None:
            if len(self._known) >= MAX_KNOWN_HEADERS:
                self._known.clear()
            self._known[header_value] = caller
        authorize(caller, needed)
        return caller

    async def authenticate_metadata(
        self, metadata: tuple[tuple[str, str | bytes], ...], needed: Role
    ) -> Caller:
        """The authorized Caller for gRPC call metadata."""
        headers: dict[str, str] = {}
        for key, value in metadata:
            if isinstance(value, str):
                headers.setdefault(key.lower(), value)
        caller = await self.authenticate_bearer(headers.get(AUTHORIZATION_HEADER))
        authorize(caller, needed)
        return caller

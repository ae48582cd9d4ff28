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

AUTHORIZATION_HEADER = "authorization"

PUBLIC_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
# The role each service family requires, by method prefix; first match wins.
METHOD_ROLES: tuple[tuple[str, Role], ...] = (
    ("/orchestrator.v1.TaskUpdateService/", Role.SERVICE),
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
        raise PermissionDenied(
            f"this method needs an API key with the {needed.value} role, "
            f"the key {caller.key_id} has the {caller.role.value} role"
        )


class Authenticator:
    """authenticate_bearer bound to one key store: what the interceptor and the WebSocket
    bridge hold (``OrchestratorServer.authenticator``)."""

    def __init__(self, keys: ApiKeyManager) -> None:
        self.keys = keys

    async def authenticate_bearer(self, header_value: str | None) -> Caller:
        return await authenticate_bearer(header_value, self.keys)

    async def authenticate_header(self, header_value: str | None, needed: Role) -> Caller:
        """The authorized Caller for an ``authorization`` header value. The key is looked up
        on every call."""
        record = await self.keys.verify(bearer_token(header_value))
        # Positional: a third cheaper than keywords, and this runs on every call.
        caller = Caller(record.tenant_id, record.role, record.key_id, record.services)
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

"""orchestrator.admin.v1.AdminService: API key management for operators (admin role)."""

from __future__ import annotations

from typing import Any

import grpc

from domain.api_keys import ApiKey, ApiKeyManager
from domain.identity import Role
from handlers.converters import timestamp_from_ms
from handlers.errors import unary_errors
from orchestrator.admin.v1 import admin_pb2, admin_pb2_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]

_ROLE_TO_PB = {
    Role.CLIENT: admin_pb2.API_KEY_ROLE_CLIENT,
    Role.SERVICE: admin_pb2.API_KEY_ROLE_SERVICE,
    Role.ADMIN: admin_pb2.API_KEY_ROLE_ADMIN,
}
_ROLE_FROM_PB = {value: role.value for role, value in _ROLE_TO_PB.items()}


def api_key_to_pb(key: ApiKey) -> admin_pb2.ApiKey:
    """The public record of a key (never its secret or hash)."""
    message = admin_pb2.ApiKey(
        key_id=key.key_id,
        tenant_id=key.tenant_id,
        role=_ROLE_TO_PB[key.role],
        description=key.description,
        create_time=timestamp_from_ms(key.created_at_ms),
        revoked=key.revoked,
    )
    if key.revoked_at_ms is not None:
        message.revoke_time.CopyFrom(timestamp_from_ms(key.revoked_at_ms))
    return message


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """Thin adapter over domain.api_keys.ApiKeyManager."""

    def __init__(self, keys: ApiKeyManager) -> None:
        self._keys = keys

    @unary_errors
    async def CreateApiKey(
        self, request: admin_pb2.CreateApiKeyRequest, context: Ctx
    ) -> admin_pb2.CreateApiKeyResponse:
        # An unset or unknown role maps to "", which the domain refuses as InvalidArgument.
        role = _ROLE_FROM_PB.get(request.role, "")
        issued = await self._keys.create(request.tenant_id, role, request.description)
        return admin_pb2.CreateApiKeyResponse(
            key_id=issued.record.key_id,
            api_key=issued.api_key,
            key=api_key_to_pb(issued.record),
        )

    @unary_errors
    async def ListApiKeys(
        self, request: admin_pb2.ListApiKeysRequest, context: Ctx
    ) -> admin_pb2.ListApiKeysResponse:
        page = await self._keys.list(request.tenant_id, request.page_size, request.page_token)
        return admin_pb2.ListApiKeysResponse(
            keys=[api_key_to_pb(key) for key in page.items],
            next_page_token=page.next_cursor or "",
        )

    @unary_errors
    async def RevokeApiKey(
        self, request: admin_pb2.RevokeApiKeyRequest, context: Ctx
    ) -> admin_pb2.RevokeApiKeyResponse:
        revoked = await self._keys.revoke(request.key_id)
        return admin_pb2.RevokeApiKeyResponse(key=api_key_to_pb(revoked))

"""Server interceptors.

CallerInterceptor establishes who is calling and binds it (domain.identity) for the handler.
Until API-key authentication lands, the tenant comes from the ``x-tenant-id`` header and the
role from ``x-caller-role`` (default ``client``). Health and reflection need no identity.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from domain.identity import Caller, Role, bind_caller, unbind_caller
from domain.ids import is_tenant_id

TENANT_HEADER = "x-tenant-id"
ROLE_HEADER = "x-caller-role"
REQUEST_ID_HEADER = "x-request-id"

PUBLIC_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
# The role each service requires; methods of other services require CLIENT.
SERVICE_ROLES: dict[str, Role] = {
    "/orchestrator.v1.TaskUpdateService/": Role.SERVICE,
}

Ctx = grpc.aio.ServicerContext[Any, Any]


class IdentityError(Exception):
    """Why a call is refused before it reaches its handler."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def required_role(method: str) -> Role | None:
    """The role a method needs, or None for public methods."""
    if method.startswith(PUBLIC_PREFIXES):
        return None
    for prefix, role in SERVICE_ROLES.items():
        if method.startswith(prefix):
            return role
    return Role.CLIENT


def caller_from_headers(metadata: tuple[tuple[str, str | bytes], ...], needed: Role) -> Caller:
    """Build the Caller from request headers; IdentityError when it is missing or not allowed."""
    headers = {key: value for key, value in metadata if isinstance(value, str)}
    tenant = headers.get(TENANT_HEADER, "")
    if not tenant:
        raise IdentityError(grpc.StatusCode.UNAUTHENTICATED, f"missing {TENANT_HEADER} header")
    if not is_tenant_id(tenant):
        raise IdentityError(
            grpc.StatusCode.UNAUTHENTICATED,
            f"{TENANT_HEADER} must be 1-64 letters, digits, '.', '_' or '-'",
        )
    try:
        role = Role(headers.get(ROLE_HEADER, Role.CLIENT.value))
    except ValueError:
        raise IdentityError(grpc.StatusCode.PERMISSION_DENIED, "unknown caller role") from None
    if role is not needed:
        raise IdentityError(
            grpc.StatusCode.PERMISSION_DENIED, f"this method needs the {needed.value} role"
        )
    request_id = headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
    return Caller(tenant_id=tenant, role=role, request_id=request_id[:128])


class CallerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Binds the caller's identity around each handler, refusing calls without one."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        needed = required_role(method)
        if handler is None or needed is None:
            return handler
        return _wrap(handler, needed)


def _identify(context: Ctx, needed: Role) -> Caller:
    return caller_from_headers(tuple(context.invocation_metadata() or ()), needed)


def _wrap(handler: Any, needed: Role) -> Any:
    """The same handler with each behavior run under the caller's identity."""

    def unary(behavior: Callable[[Any, Ctx], Awaitable[Any]]) -> Any:
        async def run(request: Any, context: Ctx) -> Any:
            try:
                caller = _identify(context, needed)
            except IdentityError as exc:
                await context.abort(exc.code, exc.message)
            token = bind_caller(caller)
            try:
                return await behavior(request, context)
            finally:
                unbind_caller(token)

        return run

    def streaming(behavior: Callable[[Any, Ctx], AsyncIterator[Any]]) -> Any:
        async def run(request: Any, context: Ctx) -> AsyncIterator[Any]:
            try:
                caller = _identify(context, needed)
            except IdentityError as exc:
                await context.abort(exc.code, exc.message)
            # Each RPC runs in its own task (its own context copy), so the binding needs no
            # reset; resetting from a generator's finally may run in another context.
            bind_caller(caller)
            async for response in behavior(request, context):
                yield response

        return run

    if handler.unary_unary:
        return handler._replace(unary_unary=unary(handler.unary_unary))
    if handler.stream_unary:
        return handler._replace(stream_unary=unary(handler.stream_unary))
    if handler.unary_stream:
        return handler._replace(unary_stream=streaming(handler.unary_stream))
    return handler._replace(stream_stream=streaming(handler.stream_stream))

"""Server interceptors.

CallerInterceptor authenticates each call by its bearer API key (server.auth), checks the role
the method needs, and binds the Caller (domain.identity) for the handler. Health and reflection
are public. A missing or bad key ends the call UNAUTHENTICATED, the wrong role
PERMISSION_DENIED, an unreachable key store UNAVAILABLE.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from domain.errors import DomainError
from domain.identity import Caller, Role, bind_caller, unbind_caller
from handlers.errors import abort_internal, abort_with
from server.auth import Authenticator, required_role

Ctx = grpc.aio.ServicerContext[Any, Any]


class CallerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Binds the authenticated caller around each handler, refusing calls without one."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

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
        return _wrap(handler, self._authenticator, needed)


async def _identify(context: Ctx, authenticator: Authenticator, needed: Role) -> Caller:
    """The authorized caller, or the call ends with the matching status."""
    try:
        return await authenticator.authenticate_metadata(
            tuple(context.invocation_metadata() or ()), needed
        )
    except DomainError as error:
        await abort_with(context, error)
    except Exception as exc:
        await abort_internal(context, exc)
    raise AssertionError("unreachable: abort raises")


def _wrap(handler: Any, authenticator: Authenticator, needed: Role) -> Any:
    """The same handler with each behavior run under the caller's identity."""

    def unary(behavior: Callable[[Any, Ctx], Awaitable[Any]]) -> Any:
        async def run(request: Any, context: Ctx) -> Any:
            caller = await _identify(context, authenticator, needed)
            token = bind_caller(caller)
            try:
                return await behavior(request, context)
            finally:
                unbind_caller(token)

        return run

    def streaming(behavior: Callable[[Any, Ctx], AsyncIterator[Any]]) -> Any:
        async def run(request: Any, context: Ctx) -> AsyncIterator[Any]:
            caller = await _identify(context, authenticator, needed)
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

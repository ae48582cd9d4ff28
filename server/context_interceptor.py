"""The outermost edge interceptor: request id and trace context for every call.

It takes the request id from the caller's ``x-request-id`` (when it is 1-128 safe characters;
otherwise a new one is generated), returns it in the initial metadata of every RPC, health and
reflection included, and binds it with the incoming W3C ``traceparent`` in
domain.request_context, where logs, the identity layer and downstream clients read them.

Sending the initial metadata up front means handlers must not send their own; they can add
trailing metadata freely.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from domain.request_context import (
    REQUEST_ID_HEADER,
    TRACEPARENT_HEADER,
    bind_request_context,
    new_request_id,
    parse_traceparent,
    valid_request_id,
)
from server.wrapping import Ctx, HandlerCache, StreamBehavior, UnaryBehavior, wrap_handler


def request_context_from(context: Ctx) -> tuple[str, str | None]:
    """(request id, traceparent or None) from the call's metadata."""
    request_id = ""
    traceparent: str | None = None
    for key, value in context.invocation_metadata() or ():
        if not isinstance(value, str):
            continue
        if key == REQUEST_ID_HEADER:
            request_id = value
        elif key == TRACEPARENT_HEADER:
            traceparent = value
    if not valid_request_id(request_id):
        request_id = new_request_id()
    return request_id, parse_traceparent(traceparent)


class ContextInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Binds the request context and echoes the request id in the initial metadata."""

    def __init__(self) -> None:
        self._cache = HandlerCache()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        return self._cache.get(
            method, handler, lambda: wrap_handler(handler, _unary(method), _streaming(method))
        )


async def _begin(context: Ctx, method: str) -> None:
    request_id, traceparent = request_context_from(context)
    bind_request_context(request_id, traceparent, method)
    await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))


def _unary(method: str) -> Callable[[UnaryBehavior], UnaryBehavior]:
    def wrap(behavior: UnaryBehavior) -> UnaryBehavior:
        async def run(request: Any, context: Ctx) -> Any:
            await _begin(context, method)
            return await behavior(request, context)

        return run

    return wrap


def _streaming(method: str) -> Callable[[StreamBehavior], StreamBehavior]:
    def wrap(behavior: StreamBehavior) -> StreamBehavior:
        async def run(request: Any, context: Ctx) -> AsyncIterator[Any]:
            await _begin(context, method)
            async for response in behavior(request, context):
                yield response

        return run

    return wrap

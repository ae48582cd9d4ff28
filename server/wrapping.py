"""Wrapping a gRPC method handler's behavior, shared by the edge interceptors.

grpc.aio hands an interceptor a method handler with one of four behaviors; an interceptor
returns the same handler with that behavior wrapped. Unary-response behaviors (unary-unary,
stream-unary) are wrapped by a coroutine; server-streaming ones (unary-stream, stream-stream)
by an async generator, so OpenTelemetry's aio interceptor (which iterates them) can wrap them.
A server-streaming behavior written as a coroutine that calls ``context.write`` (grpc's health
Watch is one) cannot be iterated, so it gets a coroutine wrapper (``stream_coroutine``, by
default the unary one).

The wrapped handler depends only on the method, so each interceptor keeps it per method
instead of building a new one on every call (grpc returns the same handler object for a
registered method each time; the cache checks that).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

Ctx = grpc.aio.ServicerContext[Any, Any]
UnaryBehavior = Callable[[Any, Ctx], Awaitable[Any]]
StreamBehavior = Callable[[Any, Ctx], AsyncIterator[Any]]


def wrap_handler(
    handler: Any,
    unary: Callable[[UnaryBehavior], UnaryBehavior],
    streaming: Callable[[StreamBehavior], StreamBehavior],
    stream_coroutine: Callable[[UnaryBehavior], UnaryBehavior] | None = None,
) -> Any:
    """``handler`` with its behavior wrapped by ``unary`` or ``streaming`` (or
    ``stream_coroutine`` for a server-streaming behavior that is a coroutine function)."""
    if handler.unary_unary:
        return handler._replace(unary_unary=unary(handler.unary_unary))
    if handler.stream_unary:
        return handler._replace(stream_unary=unary(handler.stream_unary))
    field = "unary_stream" if handler.unary_stream else "stream_stream"
    behavior = getattr(handler, field)
    if inspect.iscoroutinefunction(behavior):
        return handler._replace(**{field: (stream_coroutine or unary)(behavior)})
    return handler._replace(**{field: streaming(behavior)})


class HandlerCache:
    """Wrapped handlers by method, valid while grpc returns the same inner handler."""

    def __init__(self) -> None:
        self._by_method: dict[str, tuple[Any, Any]] = {}

    def get(self, method: str, handler: Any, build: Callable[[], Any]) -> Any:
        cached = self._by_method.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = build()
        if len(self._by_method) < 10_000:  # bounded: unknown methods never get this far
            self._by_method[method] = (handler, wrapped)
        return wrapped

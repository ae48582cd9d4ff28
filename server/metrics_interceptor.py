"""Counts every RPC by method and final status code, times it, and tracks open streams.

It sits outside the identity and rate-limit interceptors, so their refusals
(UNAUTHENTICATED, RESOURCE_EXHAUSTED) are counted like any other outcome. The final code is the
one the call set (``context.code()``, set by abort or set_code); a behavior that returns without
setting one ended OK, one that raised something else ended UNKNOWN, a cancelled one CANCELLED.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from server import metrics as metrics_module
from server.metrics import Metrics
from server.wrapping import Ctx, HandlerCache, StreamBehavior, UnaryBehavior, wrap_handler


def _final_code(context: Ctx, default: grpc.StatusCode) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else default


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
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
            method,
            handler,
            lambda: wrap_handler(handler, self._unary(method), self._streaming(method)),
        )

    def _unary(self, method: str, stream: bool = False) -> Callable[[UnaryBehavior], UnaryBehavior]:
        """Unary-response calls, and (``stream``) streams written with ``context.write``."""
        metrics = self.metrics

        def wrap(behavior: UnaryBehavior) -> UnaryBehavior:
            async def run(request: Any, context: Ctx) -> Any:
                metrics_module.bind(metrics)
                start = time.perf_counter()
                code = grpc.StatusCode.UNKNOWN
                if stream:
                    metrics.stream_opened(method)
                try:
                    response = await behavior(request, context)
                    code = _final_code(context, grpc.StatusCode.OK)
                    return response
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                    raise
                except BaseException:
                    code = _final_code(context, grpc.StatusCode.UNKNOWN)
                    raise
                finally:
                    if stream:
                        metrics.stream_closed(method)
                    metrics.observe_rpc(method, code, time.perf_counter() - start)

            return run

        return wrap

    def _streaming(self, method: str) -> Callable[[StreamBehavior], StreamBehavior]:
        metrics = self.metrics

        def wrap(behavior: StreamBehavior) -> StreamBehavior:
            async def run(request: Any, context: Ctx) -> AsyncIterator[Any]:
                metrics_module.bind(metrics)
                start = time.perf_counter()
                code = grpc.StatusCode.UNKNOWN
                metrics.stream_opened(method)
                try:
                    async for response in behavior(request, context):
                        yield response
                    code = _final_code(context, grpc.StatusCode.OK)
                except (asyncio.CancelledError, GeneratorExit):
                    code = grpc.StatusCode.CANCELLED
                    raise
                except BaseException:
                    code = _final_code(context, grpc.StatusCode.UNKNOWN)
                    raise
                finally:
                    metrics.stream_closed(method)
                    metrics.observe_rpc(method, code, time.perf_counter() - start)

            return run

        return wrap

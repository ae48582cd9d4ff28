"""The innermost edge interceptor: per-tenant and per-key request rates, and the per-tenant cap
on open server-streaming calls.

It runs inside the identity interceptor and reads the caller it bound (peek_caller); calls
without one (health, reflection) are never limited. A refused call ends with RESOURCE_EXHAUSTED
carrying google.rpc.RetryInfo and QuotaFailure details and a ``retry-after`` trailer
(handlers.errors). When the rate-limit backend (Redis) cannot be reached the call is let through
(fail open): the limit protects the service, and refusing every call would turn a Redis outage
into a full one; calls that need Redis fail on their own with UNAVAILABLE.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from domain.errors import ResourceExhausted, Unavailable
from domain.identity import Caller, peek_caller
from domain.rate_limits import Bucket, RateLimitRules, StreamSlots
from handlers.errors import abort_with
from registry.base import RateLimiter
from server.metrics import Metrics
from server.wrapping import Ctx, HandlerCache, StreamBehavior, UnaryBehavior, wrap_handler

log = logging.getLogger(__name__)

EXEMPT_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
# At most one "limiter unavailable" warning per this many seconds.
_WARN_EVERY_S = 10.0
# Bucket tuples kept per (tenant, key id); past this many the cache starts over.
_MAX_CACHED_BUCKETS = 10_000


class RateLimitInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses calls over their tenant's (or key's) rate, and streams over the tenant's cap.
    ``limiter`` None disables the rate limit; ``streams`` None disables the stream cap."""

    def __init__(
        self,
        limiter: RateLimiter | None,
        rules: RateLimitRules,
        streams: StreamSlots | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.limiter = limiter
        self.rules = rules
        self.streams = streams
        self.metrics = metrics
        self._cache = HandlerCache()
        self._last_warning = 0.0
        # The buckets of a (tenant, key id) follow from the rules alone, which do not change.
        self._buckets: dict[tuple[str, str], tuple[Bucket, ...]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        return self._cache.get(
            method,
            handler,
            lambda: wrap_handler(handler, self._unary, self._streaming, self._stream_coroutine),
        )

    async def _check_rate(self, context: Ctx) -> None:
        caller = peek_caller()
        if caller is not None:
            await self.check_rate(caller, context)

    async def check_rate(self, caller: Caller, context: Ctx) -> None:
        """Abort the call when its tenant or key is over its rate."""
        if self.limiter is None:
            return
        buckets = self.buckets(caller.tenant_id, caller.key_id)
        try:
            decision = await self.limiter.acquire(buckets)
        except Unavailable as exc:
            now = time.monotonic()
            if now - self._last_warning >= _WARN_EVERY_S:
                self._last_warning = now
                log.warning("rate limiter unavailable, letting calls through: %s", exc)
            return
        if decision.allowed:
            return
        bucket = decision.limited or buckets[0]
        if self.metrics is not None:
            self.metrics.record_rate_limited(caller.tenant_id, bucket.kind)
        retry_after_s = decision.retry_after_ms / 1000
        await abort_with(
            context,
            ResourceExhausted(
                f"rate limit exceeded for {bucket.subject}; retry in {retry_after_s:.3f}s",
                retry_after_s=retry_after_s,
                quota_subject=bucket.subject,
                quota_description=f"at most {bucket.rate}",
            ),
        )

    def buckets(self, tenant_id: str, key_id: str) -> tuple[Bucket, ...]:
        """``rules.buckets``, built once per tenant and key."""
        subject = (tenant_id, key_id)
        buckets = self._buckets.get(subject)
        if buckets is None:
            buckets = self.rules.buckets(tenant_id, key_id)
            if len(self._buckets) >= _MAX_CACHED_BUCKETS:
                self._buckets.clear()
            self._buckets[subject] = buckets
        return buckets

    def _unary(self, behavior: UnaryBehavior) -> UnaryBehavior:
        async def run(request: Any, context: Ctx) -> Any:
            await self._check_rate(context)
            return await behavior(request, context)

        return run

    async def _take_stream_slot(self, context: Ctx) -> str | None:
        caller = peek_caller()
        return None if caller is None else await self.take_stream_slot(caller, context)

    async def take_stream_slot(self, caller: Caller, context: Ctx) -> str | None:
        """Take one of the tenant's stream slots (abort when none is left); returns the tenant
        to release it for, or None when streams are not capped for this call."""
        slots = self.streams
        if slots is None:
            return None
        tenant = caller.tenant_id
        if not slots.try_acquire(tenant):
            if self.metrics is not None:
                self.metrics.record_rate_limited(tenant, "streams")
            await abort_with(
                context,
                ResourceExhausted(
                    f"too many open streams for tenant {tenant} (at most {slots.limit})",
                    quota_subject=f"tenant:{tenant}",
                    quota_description=f"at most {slots.limit} open streaming calls",
                ),
            )
        return tenant

    def release(self, tenant: str | None) -> None:
        if tenant is not None and self.streams is not None:
            self.streams.release(tenant)

    def _streaming(self, behavior: StreamBehavior) -> StreamBehavior:
        async def run(request: Any, context: Ctx) -> AsyncIterator[Any]:
            await self._check_rate(context)
            tenant = await self._take_stream_slot(context)
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                self.release(tenant)

        return run

    def _stream_coroutine(self, behavior: UnaryBehavior) -> UnaryBehavior:
        """A server stream written with ``context.write``."""

        async def run(request: Any, context: Ctx) -> Any:
            await self._check_rate(context)
            tenant = await self._take_stream_slot(context)
            try:
                return await behavior(request, context)
            finally:
                self.release(tenant)

        return run

"""The edge's rate checks: per-tenant and per-key request rates, and the per-tenant cap on
open server-streaming calls (server.edge calls them once it knows the caller).

A refused call ends with RESOURCE_EXHAUSTED carrying google.rpc.RetryInfo and QuotaFailure
details and a ``retry-after`` trailer (handlers.errors). When the rate-limit backend (Redis)
cannot be reached the call is let through (fail open): the limit protects the service, and
refusing every call would turn a Redis outage into a full one; calls that need Redis fail on
their own with UNAVAILABLE.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from domain.errors import ResourceExhausted, Unavailable
from domain.identity import Caller
from domain.ports.rate_limits import RateLimiter
from domain.rate_limits import Bucket, KeyRef, RateLimitRules, StreamSlots
from handlers.errors import abort_with
from server.log_sampling import Sampler
from server.metrics import Metrics
from server.wrapping import Ctx

log = logging.getLogger(__name__)

# At most one "limiter unavailable" warning per this many seconds.
_WARN_EVERY_S = 10.0
# Bucket tuples kept per (tenant, key id); past this many the cache starts over.
_MAX_CACHED_BUCKETS = 10_000


@dataclass(eq=False)
class EdgeLimits:
    """Refuses calls over their tenant's (or key's) rate, and streams over the tenant's cap.
    ``limiter`` None disables the rate limit and the key check that goes with it (benchmarks);
    ``rate_enabled`` False keeps the limiter for the key check only; ``streams`` None disables
    the stream cap."""

    limiter: RateLimiter | None
    rules: RateLimitRules
    streams: StreamSlots | None = None
    metrics: Metrics | None = None
    rate_enabled: bool = True
    _warnings: Sampler = field(init=False, default_factory=lambda: Sampler(_WARN_EVERY_S))
    # The buckets of a (tenant, key id) follow from the rules alone, which do not change.
    _buckets: dict[tuple[str, str], tuple[tuple[Bucket, ...], KeyRef]] = field(
        init=False, default_factory=dict
    )

    @property
    def checks_keys(self) -> bool:
        """Whether ``check_rate(..., check_key=True)`` checks the key's standing."""
        return self.limiter is not None

    async def check_rate(self, caller: Caller, context: Ctx, *, check_key: bool = False) -> bool:
        """Abort the call when its tenant or key is over its rate. With ``check_key`` the
        caller's key is checked in the same step (domain.ports.rate_limits): False when it is
        revoked or unknown (nothing charged, the call not ended: the caller authenticates it
        again). A backend that cannot be reached lets the call through, unless the key was to
        be checked: then the call ends UNAVAILABLE, as a key lookup that fails does."""
        limiter = self.limiter
        if limiter is None or not (check_key or self.rate_enabled):
            return True
        buckets, key = self.buckets(caller.tenant_id, caller.key_id)
        try:
            decision = await limiter.acquire(buckets, key if check_key else None)
        except Unavailable as exc:
            if check_key:
                await abort_with(context, exc)
            if self._warnings.due(time.monotonic()):
                log.warning("rate limiter unavailable, letting calls through: %s", exc)
            return True
        if decision.allowed:
            return True
        if not decision.key_live:
            return False
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
        return True  # unreachable: abort raises

    def buckets(self, tenant_id: str, key_id: str) -> tuple[tuple[Bucket, ...], KeyRef]:
        """``rules.buckets`` (none when the rate is not limited) and the key they are for,
        built once per tenant and key."""
        subject = (tenant_id, key_id)
        found = self._buckets.get(subject)
        if found is None:
            buckets = self.rules.buckets(tenant_id, key_id) if self.rate_enabled else ()
            found = (buckets, KeyRef(tenant_id, key_id))
            if len(self._buckets) >= _MAX_CACHED_BUCKETS:
                self._buckets.clear()
            self._buckets[subject] = found
        return found

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

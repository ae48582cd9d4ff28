"""Rate-limit rules: how many requests per second a tenant and one of its API keys may make.

Limits are GCRA (generic cell rate algorithm): each bucket stores one number, its theoretical
arrival time (TAT). A request is allowed when ``TAT + interval - burst * interval <= now``;
allowing it moves the TAT one emission interval forward. Equivalent to a token bucket of size
``burst`` refilled at ``per_second``, but with O(1) state and an exact retry-after. The registry
backends (registry.memory_rate_limiter, registry.redis_rate_limiter) apply these rules; the Redis
one does it in one Lua script with the Redis clock so every replica shares one limit.

Also here: the per-process cap on concurrently open server-streaming calls per tenant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from domain.ids import tenant_entries


@dataclass(frozen=True, slots=True)
class Rate:
    """``per_second`` sustained requests with bursts of up to ``burst`` requests."""

    per_second: float
    burst: int

    def __post_init__(self) -> None:
        if not (self.per_second > 0 and math.isfinite(self.per_second)):
            raise ValueError(f"rate must be a positive number, got {self.per_second}")
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, got {self.burst}")

    @property
    def interval_us(self) -> float:
        """Microseconds between two requests at the sustained rate (the emission interval)."""
        return 1_000_000 / self.per_second

    def __str__(self) -> str:
        return f"{self.per_second:g}/s burst {self.burst}"


@dataclass(frozen=True, slots=True)
class Bucket:
    """One limit to check: the tenant's own (``key_id`` empty) or one of its API keys'."""

    tenant_id: str
    key_id: str
    rate: Rate

    @property
    def subject(self) -> str:
        """Names the limit in google.rpc.QuotaFailure and logs."""
        return f"key:{self.key_id}" if self.key_id else f"tenant:{self.tenant_id}"

    @property
    def kind(self) -> str:
        return "key" if self.key_id else "tenant"


@dataclass(frozen=True, slots=True)
class KeyRef:
    """An API key whose standing an acquire checks in the same step (domain.ports.rate_limits):
    its tenant (whose buckets it draws from) and its id."""

    tenant_id: str
    key_id: str


@dataclass(frozen=True, slots=True)
class RateDecision:
    """The outcome of one acquire: allowed, or refused with when to retry and which bucket.
    ``key_live`` False: the key checked with it is revoked or unknown (nothing was charged)."""

    allowed: bool
    retry_after_ms: int = 0
    limited: Bucket | None = None
    key_live: bool = True


ALLOWED = RateDecision(allowed=True)
KEY_NOT_LIVE = RateDecision(allowed=False, key_live=False)


def gcra(tat_us: float | None, now_us: float, rate: Rate) -> tuple[float, float]:
    """One GCRA step: (new TAT if allowed, microseconds to wait; 0 means allowed now).
    The Redis Lua script is the same arithmetic; keep the two in step."""
    tat = now_us if tat_us is None or tat_us < now_us else tat_us
    # The wait is (tat + interval) - interval * burst - now, summed in this order: with a large
    # interval, adding it to the clock and taking it off again loses the clock's low bits and
    # a full bucket would refuse its first call by a fraction of a microsecond.
    wait_us = (tat - now_us) - rate.interval_us * (rate.burst - 1)
    return tat + rate.interval_us, max(0.0, wait_us)


def parse_overrides(raw: str) -> dict[str, Rate]:
    """``tenantA=5:10,tenantB=1000:2000`` (rate:burst; ``tenantC=20`` means burst 20 too)."""
    overrides: dict[str, Rate] = {}
    for tenant, spec, item in tenant_entries(raw, "tenant=rate:burst"):
        rate_text, _, burst_text = spec.partition(":")
        try:
            per_second = float(rate_text)
            burst = int(burst_text) if burst_text else max(1, math.ceil(per_second))
            overrides[tenant] = Rate(per_second, burst)
        except ValueError as exc:
            raise ValueError(f"bad rate limit override {item!r}: {exc}") from None
    return overrides


@dataclass(frozen=True, slots=True)
class RateLimitRules:
    """Which buckets a call draws from: its tenant's (the default rate or the tenant's
    override) and, when the caller used an API key and a key rate is set, the key's."""

    default: Rate
    key: Rate | None = None
    overrides: Mapping[str, Rate] = field(default_factory=dict)

    def tenant_rate(self, tenant_id: str) -> Rate:
        return self.overrides.get(tenant_id, self.default)

    def buckets(self, tenant_id: str, key_id: str = "") -> tuple[Bucket, ...]:
        tenant_bucket = Bucket(tenant_id, "", self.tenant_rate(tenant_id))
        if key_id and self.key is not None:
            return (tenant_bucket, Bucket(tenant_id, key_id, self.key))
        return (tenant_bucket,)


class StreamSlots:
    """Concurrently open server-streaming calls per tenant, counted in this process only.

    A per-process count is enough to stop one tenant from exhausting a replica's connections
    and memory (the resource the cap protects lives in the process too); the cluster-wide cap
    is therefore ``replicas * limit``. Counting in memory needs no lease renewal and cannot
    leak slots when a replica dies.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def try_acquire(self, tenant_id: str) -> bool:
        count = self._open.get(tenant_id, 0)
        if count >= self.limit:
            return False
        self._open[tenant_id] = count + 1
        return True

    def release(self, tenant_id: str) -> None:
        count = self._open.get(tenant_id, 0) - 1
        if count > 0:
            self._open[tenant_id] = count
        else:
            self._open.pop(tenant_id, None)

    def open_streams(self, tenant_id: str) -> int:
        return self._open.get(tenant_id, 0)


class FailureThrottle:
    """Per-peer limit on failed attempts (failed authentications): a peer may fail ``rate.burst``
    times at once, then once per ``rate.interval_us``; past that ``retry_after_s`` says how long
    it must wait. GCRA as above, kept in process memory for at most ``max_peers`` peers (the
    least recently failing are forgotten first, and a peer whose failures are all forgiven
    holds no entry once touched), so a flood of addresses cannot grow it without bound."""

    def __init__(self, rate: Rate, *, max_peers: int = 10_000) -> None:
        self.rate = rate
        self.max_peers = max_peers
        self._tats: dict[str, float] = {}  # insertion order = least recently failing first

    def __len__(self) -> int:
        return len(self._tats)

    def retry_after_s(self, peer: str, now_s: float) -> float:
        """0 when ``peer`` may try now, else the seconds until it may."""
        tat = self._tats.get(peer)
        if tat is None:
            return 0.0
        now_us = now_s * 1_000_000
        if tat <= now_us:
            del self._tats[peer]
            return 0.0
        return gcra(tat, now_us, self.rate)[1] / 1_000_000

    def record_failure(self, peer: str, now_s: float) -> None:
        now_us = now_s * 1_000_000
        new_tat, wait_us = gcra(self._tats.pop(peer, None), now_us, self.rate)
        if wait_us > 0:  # already throttled: keep the bucket as it is
            new_tat -= self.rate.interval_us
        self._tats[peer] = new_tat
        while len(self._tats) > self.max_peers:
            del self._tats[next(iter(self._tats))]

"""The rate limiter (registry.redis_rate_limiter on Redis, registry.memory_rate_limiter in
memory). The limits and the GCRA arithmetic live in domain.rate_limits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from domain.rate_limits import Bucket, KeyRef, RateDecision


class RateLimiter(Protocol):
    """Request-rate limits (domain.rate_limits, GCRA) shared by every replica using the
    backend. All buckets of one call belong to one tenant."""

    async def acquire(self, buckets: Sequence[Bucket], key: KeyRef | None = None) -> RateDecision:
        """Take one request from every bucket, atomically: either all allow it and all are
        charged, or none is charged and the decision names the bucket that needs the longest
        wait. With ``key`` (an API key of the buckets' tenant; ``buckets`` may then be empty)
        the key's standing is checked in the same step, against the key store of the same
        backend: a key revoked or unknown there gets ``key_live`` False and charges nothing.
        So the edge checks a key it has verified once and the caller's rate in one round
        trip, and a revocation still counts on every replica at the next call. Raises
        domain.errors.Unavailable when the backend cannot be reached."""
        ...

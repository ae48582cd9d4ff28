"""The rate limiter (registry.redis_rate_limiter on Redis, registry.memory_rate_limiter in
memory). The limits and the GCRA arithmetic live in domain.rate_limits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from domain.rate_limits import Bucket, RateDecision


class RateLimiter(Protocol):
    """Request-rate limits (domain.rate_limits, GCRA) shared by every replica using the
    backend. All buckets of one call belong to one tenant."""

    async def acquire(self, buckets: Sequence[Bucket]) -> RateDecision:
        """Take one request from every bucket, atomically: either all allow it and all are
        charged, or none is charged and the decision names the bucket that needs the longest
        wait. Raises domain.errors.Unavailable when the backend cannot be reached."""
        ...

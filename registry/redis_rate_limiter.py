"""Rate limits in Redis: one GCRA state string per bucket, checked and charged by one Lua script.

The script reads the clock with ``TIME`` on the Redis server, so every replica sees the same time
and shares one limit however skewed their clocks are. The tenant bucket and the key bucket are
checked together and charged only if both allow the request, so a refused request costs nothing.
Both keys carry the tenant's hash tag (registry.keys), so the script is atomic on a cluster too.
Each state key expires once its bucket is full again (an idle bucket needs no storage).
"""

from __future__ import annotations

from collections.abc import Sequence

from domain.rate_limits import ALLOWED, Bucket, RateDecision
from registry.redis_client import RedisStore, redis_errors_as_unavailable


class RedisRateLimiter(RedisStore):
    """GCRA limits shared by every replica on one Redis."""

    SCRIPTS = "rate_limits"

    async def acquire(self, buckets: Sequence[Bucket]) -> RateDecision:
        if not buckets:
            return ALLOWED
        keys = [self._keys.rate_limit(b.tenant_id, b.key_id) for b in buckets]
        args: list[str] = []
        for bucket in buckets:
            args += [repr(bucket.rate.interval_us), str(bucket.rate.burst)]
        with redis_errors_as_unavailable():
            allowed, retry_after_ms, index = await self._scripts.run(
                "acquire", keys=keys, args=args
            )
        if int(allowed) == 1:
            return ALLOWED
        return RateDecision(False, retry_after_ms=int(retry_after_ms), limited=buckets[index - 1])

"""Rate limits in Redis: one GCRA state string per bucket, checked and charged by one Lua script.

The script reads the clock with ``TIME`` on the Redis server, so every replica sees the same time
and shares one limit however skewed their clocks are. The tenant bucket and the key bucket are
checked together and charged only if both allow the request, so a refused request costs nothing.
Both keys carry the tenant's hash tag (registry.keys), so the script is atomic on a cluster too.
Each state key expires once its bucket is full again (an idle bucket needs no storage).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from domain.rate_limits import ALLOWED, Bucket, RateDecision
from registry.keys import KeySpace
from registry.redis_client import redis_errors_as_unavailable

# KEYS: one TAT key per bucket. ARGV: per bucket, the emission interval (us) and the burst.
# Returns {1, 0, 0} when allowed, else {0, retry_after_ms, index of the limiting bucket}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local new_tats = {}
local worst, worst_i = 0, 0
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local stored = redis.call('GET', KEYS[i])
  local tat = now
  if stored then tat = math.max(tonumber(stored), now) end
  local new_tat = tat + interval
  local wait = new_tat - interval * burst - now
  if wait > worst then worst, worst_i = wait, i end
  new_tats[i] = new_tat
end
if worst_i > 0 then
  return {0, math.max(1, math.ceil(worst / 1000)), worst_i}
end
for i = 1, #KEYS do
  local ttl_ms = math.ceil((new_tats[i] - now) / 1000) + 1
  redis.call('SET', KEYS[i], string.format('%.0f', new_tats[i]), 'PX', string.format('%d', ttl_ms))
end
return {1, 0, 0}
"""


class RedisRateLimiter:
    """GCRA limits shared by every replica on one Redis."""

    def __init__(self, redis: Redis, keys: KeySpace) -> None:
        self._keys = keys
        self._acquire: Any = redis.register_script(_ACQUIRE)

    async def acquire(self, buckets: Sequence[Bucket]) -> RateDecision:
        if not buckets:
            return ALLOWED
        keys = [self._keys.rate_limit(b.tenant_id, b.key_id) for b in buckets]
        args: list[str] = []
        for bucket in buckets:
            args += [repr(bucket.rate.interval_us), str(bucket.rate.burst)]
        with redis_errors_as_unavailable():
            allowed, retry_after_ms, index = await self._acquire(keys=keys, args=args)
        if int(allowed) == 1:
            return ALLOWED
        return RateDecision(False, retry_after_ms=int(retry_after_ms), limited=buckets[index - 1])

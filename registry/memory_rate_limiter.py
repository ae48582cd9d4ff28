"""Rate limits in process memory, for the single-process embedded mode (no REDIS_URL).

Same GCRA arithmetic as the Redis backend (domain.rate_limits.gcra), on the monotonic clock.
Limits are per process: with several replicas and no Redis each one enforces its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from domain.rate_limits import ALLOWED, KEY_NOT_LIVE, Bucket, KeyRef, RateDecision, gcra
from registry.api_keys_memory import MemoryApiKeyStore

# Past this many buckets, idle ones (whose TAT is in the past: a full burst available, the
# same as no entry) are dropped so memory stays bounded by the recently active callers.
_PRUNE_ABOVE = 10_000


def _monotonic_us() -> float:
    return time.monotonic_ns() / 1000


class MemoryRateLimiter:
    """GCRA buckets in a dict. Each acquire runs without awaiting, so it is atomic."""

    def __init__(
        self,
        clock_us: Callable[[], float] = _monotonic_us,
        keys: MemoryApiKeyStore | None = None,
    ) -> None:
        self._clock_us = clock_us
        # The key store of the same backend, whose keys ``acquire`` checks (none: every key
        # checked reads as unknown).
        self._keys = keys
        self._tat: dict[tuple[str, str], float] = {}

    async def acquire(self, buckets: Sequence[Bucket], key: KeyRef | None = None) -> RateDecision:
        if key is not None and (self._keys is None or not self._keys.is_live(key)):
            return KEY_NOT_LIVE
        now = self._clock_us()
        updates: list[tuple[tuple[str, str], float]] = []
        worst: tuple[float, Bucket] | None = None
        for bucket in buckets:
            subject = (bucket.tenant_id, bucket.key_id)
            new_tat, wait_us = gcra(self._tat.get(subject), now, bucket.rate)
            if wait_us > 0 and (worst is None or wait_us > worst[0]):
                worst = (wait_us, bucket)
            updates.append((subject, new_tat))
        if worst is not None:
            return RateDecision(False, retry_after_ms=_ceil_ms(worst[0]), limited=worst[1])
        self._tat.update(updates)
        if len(self._tat) > _PRUNE_ABOVE:
            self._tat = {k: tat for k, tat in self._tat.items() if tat > now}
        return ALLOWED


def _ceil_ms(us: float) -> int:
    return max(1, -(-int(us) // 1000))

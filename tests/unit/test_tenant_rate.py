"""domain.internal_calls.TenantRate: an internal call takes one request of its job tenant's
own bucket; a limiter that cannot be reached lets the call through, as the edge does."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from domain.errors import ResourceExhausted, Unavailable
from domain.internal_calls import TenantRate
from domain.rate_limits import Bucket, KeyRef, Rate, RateDecision, RateLimitRules
from registry.memory_rate_limiter import MemoryRateLimiter

RULES = RateLimitRules(default=Rate(1000, 1000), key=Rate(1, 1), overrides={"acme": Rate(0.001, 1)})


class DownLimiter:
    async def acquire(self, buckets: Sequence[Bucket], key: KeyRef | None = None) -> RateDecision:
        raise Unavailable("redis is down")


async def test_a_call_takes_from_the_tenants_own_bucket_and_is_refused_with_a_delay() -> None:
    rate = TenantRate(MemoryRateLimiter(), RULES)
    await rate.take("acme")
    with pytest.raises(ResourceExhausted) as refused:
        await rate.take("acme")
    assert refused.value.quota_subject == "tenant:acme"
    assert refused.value.retry_after_s is not None and refused.value.retry_after_s > 0
    await rate.take("globex")  # another tenant's bucket is its own


async def test_an_unreachable_limiter_lets_calls_through() -> None:
    rate = TenantRate(DownLimiter(), RULES)
    await rate.take("acme")
    await rate.take("acme")

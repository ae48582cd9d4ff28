"""The rate limiter contract, run against the memory and the Redis backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from domain.ports.rate_limits import RateLimiter
from domain.rate_limits import Rate, RateLimitRules
from registry.keys import KeySpace
from registry.memory_rate_limiter import MemoryRateLimiter
from registry.redis_client import create_redis
from registry.redis_rate_limiter import RedisRateLimiter


@pytest.fixture
async def limiter(backend_url: str | None) -> AsyncIterator[RateLimiter]:
    if backend_url is None:
        yield MemoryRateLimiter()
        return
    redis: Redis = create_redis(backend_url, socket_timeout_s=1.0, connect_timeout_s=0.5)
    yield RedisRateLimiter(redis, KeySpace("test"))
    await redis.aclose()


async def test_a_burst_is_allowed_then_refused_with_a_retry_delay(limiter: RateLimiter) -> None:
    rules = RateLimitRules(Rate(per_second=2, burst=3))
    for _ in range(3):
        assert (await limiter.acquire(rules.buckets("acme"))).allowed
    refused = await limiter.acquire(rules.buckets("acme"))
    assert not refused.allowed
    assert 1 <= refused.retry_after_ms <= 500
    assert refused.limited is not None and refused.limited.subject == "tenant:acme"
    # Another tenant has its own bucket.
    assert (await limiter.acquire(rules.buckets("globex"))).allowed


async def test_after_the_retry_delay_a_request_is_allowed_again(limiter: RateLimiter) -> None:
    rules = RateLimitRules(Rate(per_second=20, burst=1))
    assert (await limiter.acquire(rules.buckets("acme"))).allowed
    refused = await limiter.acquire(rules.buckets("acme"))
    assert not refused.allowed
    await asyncio.sleep(refused.retry_after_ms / 1000)
    assert (await limiter.acquire(rules.buckets("acme"))).allowed


async def test_key_and_tenant_limits_are_checked_together(limiter: RateLimiter) -> None:
    """A request refused by its key's limit does not use up the tenant's."""
    rules = RateLimitRules(Rate(per_second=0.1, burst=3), key=Rate(per_second=0.1, burst=1))
    assert (await limiter.acquire(rules.buckets("acme", "k1"))).allowed
    by_key = await limiter.acquire(rules.buckets("acme", "k1"))
    assert not by_key.allowed and by_key.limited is not None
    assert by_key.limited.subject == "key:k1"
    assert (await limiter.acquire(rules.buckets("acme", "k2"))).allowed
    assert (await limiter.acquire(rules.buckets("acme", "k3"))).allowed
    by_tenant = await limiter.acquire(rules.buckets("acme", "k4"))
    assert not by_tenant.allowed and by_tenant.limited is not None
    assert by_tenant.limited.subject == "tenant:acme"


async def test_redis_state_expires_and_shares_the_tenant_hash_tag(redis_url: str) -> None:
    redis = create_redis(redis_url, socket_timeout_s=1.0, connect_timeout_s=0.5)
    try:
        limiter = RedisRateLimiter(redis, KeySpace("test"))
        await limiter.acquire(RateLimitRules(Rate(10, 5), key=Rate(10, 5)).buckets("acme", "k1"))
        keys = sorted(await redis.keys("*"))
        assert keys == ["test:{t:acme}:ratelimit", "test:{t:acme}:ratelimit:key:k1"]
        for key in keys:
            assert 0 < await redis.pttl(key) <= 1000
    finally:
        await redis.aclose()

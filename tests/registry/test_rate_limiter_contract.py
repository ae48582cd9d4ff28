"""The rate limiter contract, run against the memory and the Redis backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from domain.identity import Role
from domain.ports.api_keys import ApiKey
from domain.ports.rate_limits import RateLimiter
from domain.rate_limits import KeyRef, Rate, RateLimitRules
from registry.backend import Backend
from registry.keys import KeySpace
from registry.memory_rate_limiter import MemoryRateLimiter
from registry.redis_client import create_redis
from registry.redis_rate_limiter import RedisRateLimiter
from tests.support.registries import opened_registry


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
    # uvloop keeps its timers in whole milliseconds: a sleep may end up to 1 ms early.
    await asyncio.sleep(refused.retry_after_ms / 1000 + 0.001)
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


# -- the key's standing, checked in the same step ----------------------------------------------


@pytest.fixture
async def keyed(backend_url: str | None) -> AsyncIterator[Backend]:
    """A backend whose rate limiter and key store belong together, with key k0001 of acme."""
    async with opened_registry(backend_url) as backend:
        await backend.api_keys.add_key(ApiKey("k0001", "acme", Role.CLIENT, "", "0" * 64))
        yield backend


KEY = KeyRef("acme", "k0001")


async def test_a_live_key_is_charged_with_its_buckets(keyed: Backend) -> None:
    rules = RateLimitRules(Rate(per_second=0.1, burst=1))
    assert (await keyed.rate_limiter.acquire(rules.buckets("acme", "k0001"), KEY)).allowed
    refused = await keyed.rate_limiter.acquire(rules.buckets("acme", "k0001"), KEY)
    assert not refused.allowed and refused.key_live and refused.limited is not None


async def test_a_revoked_key_is_not_live_and_charges_nothing(keyed: Backend) -> None:
    rules = RateLimitRules(Rate(per_second=0.1, burst=1))
    await keyed.api_keys.revoke_key("k0001")
    decision = await keyed.rate_limiter.acquire(rules.buckets("acme", "k0001"), KEY)
    assert (decision.allowed, decision.key_live) == (False, False)
    # Nothing was charged: the tenant's single request is still there.
    assert (await keyed.rate_limiter.acquire(rules.buckets("acme"))).allowed


async def test_an_unknown_key_or_another_tenants_key_is_not_live(keyed: Backend) -> None:
    for key in (KeyRef("acme", "k0404"), KeyRef("globex", "k0001")):
        decision = await keyed.rate_limiter.acquire((), key)
        assert (decision.allowed, decision.key_live) == (False, False)


async def test_a_key_is_checked_without_buckets(keyed: Backend) -> None:
    assert (await keyed.rate_limiter.acquire((), KEY)).allowed

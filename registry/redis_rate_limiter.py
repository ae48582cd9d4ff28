"""Rate limits in Redis: one GCRA state string per bucket, checked and charged by one Lua script.

The script reads the clock with ``TIME`` on the Redis server, so every replica sees the same time
and shares one limit however skewed their clocks are. The tenant bucket and the key bucket are
checked together and charged only if both allow the request, so a refused request costs nothing.
Given an API key (``acquire(buckets, key)``), the same script first checks that the key is in its
tenant's key index and not in its tenant's revoked set (registry.api_keys_redis keeps both), so
the edge checks a key it verified once and charges its rate in one round trip. Every key the
script touches carries the tenant's hash tag (registry.keys), so it is atomic on a cluster too.
Each state key expires once its bucket is full again (an idle bucket needs no storage).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from domain.rate_limits import ALLOWED, KEY_NOT_LIVE, Bucket, KeyRef, RateDecision
from registry.keys import KeySpace
from registry.lua_scripts import lua_script
from registry.redis_client import RedisStore, is_cluster, redis_errors_as_unavailable

# Script KEYS and ARGV kept per (buckets, key); past this many the cache starts over.
_MAX_CACHED_CALLS = 10_000


class RedisRateLimiter(RedisStore):
    """GCRA limits shared by every replica on one Redis."""

    SCRIPTS = "rate_limits"

    def __init__(self, redis: Redis, keys: KeySpace) -> None:
        super().__init__(redis, keys)
        self._calls: dict[tuple[tuple[Bucket, ...], KeyRef | None], _Script] = {}
        self._sha = lua_script("rate_limits/acquire").sha
        # A cluster client has no single pool: its calls take the ordinary path (routed by
        # the slot of the tenant's keys).
        self._cluster = is_cluster(redis)

    async def acquire(self, buckets: Sequence[Bucket], key: KeyRef | None = None) -> RateDecision:
        if not buckets and key is None:
            return ALLOWED
        call = self._call(tuple(buckets), key)
        with redis_errors_as_unavailable():
            try:
                if self._cluster:
                    raise NoScriptError("the cluster client takes the ordinary path")
                reply = await self._send(call)
            except (NoScriptError, RedisConnectionError):
                # A Redis that lost the script, or a pooled connection that broke (Redis
                # restarted): the ordinary path loads the script and retries on a new one.
                reply = await self._scripts.run("acquire", keys=call.keys, args=call.args)
        allowed, retry_after_ms, index = reply
        if int(allowed) == 1:
            return ALLOWED
        if int(index) < 0:
            return KEY_NOT_LIVE
        return RateDecision(False, retry_after_ms=int(retry_after_ms), limited=buckets[index - 1])

    async def _send(self, call: _Script) -> Any:
        """EVALSHA of the script on a connection of the pool, the command packed once per
        (buckets, key): this runs on every authenticated call, and redis-py's generic command
        path (argument packing, retry wrapper, response callbacks) costs about a third of it.
        A connection left in an unknown state (a transport error, or a cancellation while a
        reply is on its way) is closed before it goes back to the pool, never reused."""
        pool = self._redis.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            packed = call.packed
            if packed is None:
                packed = call.packed = connection.pack_command(
                    "EVALSHA", self._sha, len(call.keys), *call.keys, *call.args
                )
            await connection.send_packed_command(packed, check_health=False)
            return await connection.read_response()
        except ResponseError:  # a whole error reply (NOSCRIPT): the connection is in step
            raise
        except BaseException:
            await asyncio.shield(connection.disconnect())
            raise
        finally:
            await pool.release(connection)

    def _call(self, buckets: tuple[Bucket, ...], key: KeyRef | None) -> _Script:
        """The script's KEYS and ARGV for these buckets and key, built once per pair (they
        follow from them alone, and the edge asks for the same few again and again)."""
        cache = self._calls
        found = cache.get((buckets, key))
        if found is not None:
            return found
        keys: list[str] = []
        args = [key.key_id if key is not None else ""]
        if key is not None:
            keys += [
                self._keys.api_key_index(key.tenant_id),
                self._keys.revoked_api_keys(key.tenant_id),
            ]
        for bucket in buckets:
            keys.append(self._keys.rate_limit(bucket.tenant_id, bucket.key_id))
            args += [repr(bucket.rate.interval_us), str(bucket.rate.burst)]
        if len(cache) >= _MAX_CACHED_CALLS:
            cache.clear()
        found = cache[(buckets, key)] = _Script(keys, args)
        return found


class _Script:
    """One call of the script: its KEYS and ARGV, and the command as sent (once packed)."""

    __slots__ = ("args", "keys", "packed")

    def __init__(self, keys: list[str], args: list[str]) -> None:
        self.keys = keys
        self.args = args
        self.packed: Any = None

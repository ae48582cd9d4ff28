"""Sessions in Redis.

Layout (see registry.keys): a hash per session, a set of pending job ids per session and a
per-tenant index sorted set. Every change that touches more than one field or key is one Lua
script, so readers never see half an update. Scripts take the time from Redis (``TIME``), so the
replicas' clocks do not matter. Closed and expired sessions stay readable for ``retention_ms``,
then Redis drops their keys; the index forgets them lazily.
"""

from __future__ import annotations

import json

from redis.asyncio import Redis

from domain.models import NewSession, Page, Session, SessionFilter, SessionState, TokenUsage
from registry.keys import KeySpace
from registry.redis_client import pairs_to_dict, redis_errors_as_unavailable

# Shared Lua prelude: the Redis server's time in milliseconds.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: session, pending, index. ARGV: session_id, agent_id, user_id, metadata_json, ttl_ms,
# retention_ms, session key prefix (for pruning vanished index entries).
_CREATE = (
    _NOW
    + """
local ttl = tonumber(ARGV[5])
local expires = now + ttl
redis.call('HSET', KEYS[1], 'agent_id', ARGV[2], 'user_id', ARGV[3], 'metadata', ARGV[4],
  'state', 'active', 'created', now, 'updated', now, 'expires', expires, 'ttl', ttl,
  'msgs', 0, 'ptok', 0, 'ctok', 0, 'ttok', 0)
redis.call('PEXPIREAT', KEYS[1], expires + tonumber(ARGV[6]))
-- Forget up to two of the oldest index entries whose session is gone (same hash tag, so the
-- same slot), which keeps the index bounded without a sweeper.
for _, old in ipairs(redis.call('ZRANGE', KEYS[3], 0, 1)) do
  if redis.call('EXISTS', ARGV[7] .. old) == 0 then redis.call('ZREM', KEYS[3], old) end
end
redis.call('ZADD', KEYS[3], 0, ARGV[1])
return {redis.call('HGETALL', KEYS[1]), {}}
"""
)

# KEYS: session, pending. ARGV: touch ("1"/"0"), retention_ms.
_GET = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local f = redis.call('HMGET', KEYS[1], 'state', 'expires', 'ttl')
local state, expires = f[1], tonumber(f[2])
local retention = tonumber(ARGV[2])
if state == 'active' or state == 'busy' then
  if now >= expires then
    redis.call('HSET', KEYS[1], 'state', 'expired', 'updated', expires)
    redis.call('PEXPIREAT', KEYS[1], expires + retention)
    redis.call('PEXPIREAT', KEYS[2], expires + retention)
  elseif ARGV[1] == '1' then
    expires = now + tonumber(f[3])
    redis.call('HSET', KEYS[1], 'expires', expires)
    redis.call('PEXPIREAT', KEYS[1], expires + retention)
    redis.call('PEXPIREAT', KEYS[2], expires + retention)
  end
end
return {redis.call('HGETALL', KEYS[1]), redis.call('SMEMBERS', KEYS[2])}
"""
)

# KEYS: session, pending. ARGV: retention_ms, event channel. Followers of the session's events
# are told on its channel (registry.event_codec) so their streams end.
_CLOSE = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local f = redis.call('HMGET', KEYS[1], 'state', 'expires')
local state, expires = f[1], tonumber(f[2])
local retention = tonumber(ARGV[1])
if state == 'active' or state == 'busy' then
  if now >= expires then
    redis.call('HSET', KEYS[1], 'state', 'expired', 'updated', expires)
    redis.call('PEXPIREAT', KEYS[1], expires + retention)
    redis.call('PEXPIREAT', KEYS[2], expires + retention)
  else
    redis.call('HSET', KEYS[1], 'state', 'closed', 'updated', now)
    redis.call('PEXPIREAT', KEYS[1], now + retention)
    redis.call('PEXPIREAT', KEYS[2], now + retention)
    redis.call('PUBLISH', ARGV[2], '0 ' .. now .. ' closed')
  end
end
return {redis.call('HGETALL', KEYS[1]), redis.call('SMEMBERS', KEYS[2])}
"""
)

# How many index entries one ListSessions call may examine while filtering.
_LIST_SCAN_BUDGET = 2000


def session_from_hash(
    tenant_id: str,
    session_id: str,
    fields: dict[str, str],
    pending: list[str] | set[str],
    now_ms: int | None = None,
) -> Session:
    """Decode a session hash. With ``now_ms``, an open session past its expiry reads EXPIRED."""
    state = SessionState(fields["state"])
    expires = int(fields["expires"])
    updated = int(fields["updated"])
    if now_ms is not None and state.is_open and now_ms >= expires:
        state, updated = SessionState.EXPIRED, expires
    return Session(
        session_id=session_id,
        tenant_id=tenant_id,
        agent_id=fields["agent_id"],
        user_id=fields["user_id"],
        state=state,
        metadata=json.loads(fields["metadata"]),
        created_at_ms=int(fields["created"]),
        updated_at_ms=updated,
        expires_at_ms=expires,
        ttl_ms=int(fields["ttl"]),
        pending_job_ids=tuple(sorted(pending)),
        message_count=int(fields["msgs"]),
        usage=TokenUsage(int(fields["ptok"]), int(fields["ctok"]), int(fields["ttok"])),
    )


class RedisSessionStore:
    """domain.ports.sessions.SessionStore on Redis."""

    def __init__(self, redis: Redis, keys: KeySpace, *, retention_ms: int) -> None:
        self._redis = redis
        self._keys = keys
        self._retention_ms = retention_ms
        self._create = redis.register_script(_CREATE)
        self._get = redis.register_script(_GET)
        self._close = redis.register_script(_CLOSE)

    async def create_session(self, tenant_id: str, session_id: str, new: NewSession) -> Session:
        keys = self._keys
        with redis_errors_as_unavailable():
            raw = await self._create(
                keys=[
                    keys.session(tenant_id, session_id),
                    keys.session_pending(tenant_id, session_id),
                    keys.session_index(tenant_id),
                ],
                args=[
                    session_id,
                    new.agent_id,
                    new.user_id,
                    json.dumps(dict(new.metadata), separators=(",", ":")),
                    new.ttl_ms,
                    self._retention_ms,
                    keys.session(tenant_id, ""),
                ],
            )
        return session_from_hash(tenant_id, session_id, pairs_to_dict(raw[0]), raw[1])

    async def get_session(self, tenant_id: str, session_id: str, *, touch: bool) -> Session | None:
        with redis_errors_as_unavailable():
            raw = await self._get(
                keys=self._session_keys(tenant_id, session_id),
                args=["1" if touch else "0", self._retention_ms],
            )
        if not raw:
            return None
        return session_from_hash(tenant_id, session_id, pairs_to_dict(raw[0]), raw[1])

    async def close_session(self, tenant_id: str, session_id: str) -> Session | None:
        with redis_errors_as_unavailable():
            raw = await self._close(
                keys=self._session_keys(tenant_id, session_id),
                args=[self._retention_ms, self._keys.session_channel(tenant_id, session_id)],
            )
        if not raw:
            return None
        return session_from_hash(tenant_id, session_id, pairs_to_dict(raw[0]), raw[1])

    async def list_sessions(
        self, tenant_id: str, *, limit: int, after: str | None, filter: SessionFilter
    ) -> Page[Session]:
        index = self._keys.session_index(tenant_id)
        found: list[Session] = []
        cursor = after
        examined = 0
        batch = max(limit, 100)
        with redis_errors_as_unavailable():
            while examined < _LIST_SCAN_BUDGET:
                start = f"({cursor}" if cursor else "+"
                ids: list[str] = await self._redis.execute_command(  # type: ignore[no-untyped-call]
                    "ZRANGE", index, start, "-", "BYLEX", "REV", "LIMIT", 0, batch
                )
                if not ids:
                    return Page(found, None)
                pipe = self._redis.pipeline(transaction=False)
                pipe.time()
                for session_id in ids:
                    pipe.hgetall(self._keys.session(tenant_id, session_id))
                    pipe.smembers(self._keys.session_pending(tenant_id, session_id))
                replies = await pipe.execute()
                seconds, micros = replies[0]
                now_ms = int(seconds) * 1000 + int(micros) // 1000
                vanished: list[str] = []
                for i, session_id in enumerate(ids):
                    examined += 1
                    cursor = session_id
                    fields = pairs_to_dict(replies[1 + 2 * i])
                    if not fields:
                        vanished.append(session_id)
                        continue
                    session = session_from_hash(
                        tenant_id, session_id, fields, replies[2 + 2 * i], now_ms
                    )
                    if filter.matches(session):
                        found.append(session)
                        if len(found) == limit:
                            break
                if vanished:
                    await self._redis.zrem(index, *vanished)
                if len(found) == limit:
                    more = cursor != ids[-1] or len(ids) == batch
                    return Page(found, cursor if more else None)
                if len(ids) < batch:
                    return Page(found, None)
        # Scan budget spent: return what matched so far and let the caller continue.
        return Page(found, cursor)

    def _session_keys(self, tenant_id: str, session_id: str) -> list[str]:
        return [
            self._keys.session(tenant_id, session_id),
            self._keys.session_pending(tenant_id, session_id),
        ]

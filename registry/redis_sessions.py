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
from registry.redis_client import (
    RedisStore,
    page_newest_first,
    pairs_to_dict,
    redis_errors_as_unavailable,
    time_ms,
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


class RedisSessionStore(RedisStore):
    """domain.ports.sessions.SessionStore on Redis."""

    SCRIPTS = "sessions"

    def __init__(
        self, redis: Redis, keys: KeySpace, *, retention_ms: int, legacy_channel: bool = False
    ) -> None:
        """``legacy_channel``: closing also PUBLISHes on the session's classic channel (a
        rolling upgrade from releases before sharded pub/sub)."""
        super().__init__(redis, keys)
        self._retention_ms = retention_ms
        self._legacy_channel = legacy_channel

    async def create_session(self, tenant_id: str, session_id: str, new: NewSession) -> Session:
        return await self._create(tenant_id, session_id, new, keep_open=False)

    async def open_session(self, tenant_id: str, session_id: str, new: NewSession) -> Session:
        return await self._create(tenant_id, session_id, new, keep_open=True)

    async def _create(
        self, tenant_id: str, session_id: str, new: NewSession, *, keep_open: bool
    ) -> Session:
        keys = self._keys
        with redis_errors_as_unavailable():
            raw = await self._scripts.run(
                "create",
                keys=[*keys.session_keys(tenant_id, session_id), keys.session_index(tenant_id)],
                args=[
                    session_id,
                    new.agent_id,
                    new.user_id,
                    json.dumps(dict(new.metadata), separators=(",", ":")),
                    new.ttl_ms,
                    self._retention_ms,
                    keys.session(tenant_id, ""),
                    "1" if new.hidden else "0",
                    "1" if keep_open else "0",
                ],
            )
        return session_from_hash(tenant_id, session_id, pairs_to_dict(raw[0]), raw[1])

    async def get_session(self, tenant_id: str, session_id: str, *, touch: bool) -> Session | None:
        with redis_errors_as_unavailable():
            raw = await self._scripts.run(
                "get",
                keys=list(self._keys.session_keys(tenant_id, session_id)),
                args=["1" if touch else "0", self._retention_ms],
            )
        if not raw:
            return None
        return session_from_hash(tenant_id, session_id, pairs_to_dict(raw[0]), raw[1])

    async def close_session(self, tenant_id: str, session_id: str) -> Session | None:
        with redis_errors_as_unavailable():
            raw = await self._scripts.run(
                "close",
                keys=list(self._keys.session_keys(tenant_id, session_id)),
                args=[
                    self._retention_ms,
                    self._keys.event_publish_channel(
                        tenant_id, session_id, legacy=self._legacy_channel
                    ),
                ],
            )
        if not raw:
            return None
        return session_from_hash(tenant_id, session_id, pairs_to_dict(raw[0]), raw[1])

    async def list_sessions(
        self, tenant_id: str, *, limit: int, after: str | None, filter: SessionFilter
    ) -> Page[Session]:
        async def load(ids: list[str]) -> list[Session | None]:
            pipe = self._redis.pipeline(transaction=False)
            pipe.execute_command("TIME")  # not .time(): refused in a cluster pipeline
            for session_id in ids:
                keys = self._keys.session_keys(tenant_id, session_id)
                pipe.hgetall(keys.hash)
                pipe.smembers(keys.pending)
            now, *replies = await pipe.execute()
            now_ms = time_ms(now)
            sessions: list[Session | None] = []
            for session_id, raw, pending in zip(ids, replies[::2], replies[1::2], strict=True):
                fields = pairs_to_dict(raw)
                sessions.append(
                    session_from_hash(tenant_id, session_id, fields, pending, now_ms)
                    if fields
                    else None
                )
            return sessions

        with redis_errors_as_unavailable():
            return await page_newest_first(
                self._redis,
                self._keys.session_index(tenant_id),
                after=after,
                limit=limit,
                budget=_LIST_SCAN_BUDGET,
                load=load,
                keep=filter.matches,
            )

"""Batches in Redis.

Layout (registry.keys): per batch a hash (fields and counts), a hash of item states, a hash of
custom ids, a hash of the jobs running items and a stream of results whose entry ids are the
result sequences (``<sequence>-0``), so a reader resumes with XRANGE from its cursor;
per tenant an index sorted set and one string per idempotency key; one global expiry schedule.
Every multi-key change is one Lua script (registry/lua/batches/).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from redis.asyncio import Redis

from domain import batch_models
from domain.models import Page
from domain.ports.queue import QueuePriority
from registry.keys import KeySpace, shard_of
from registry.lua_scripts import ScriptPipeline
from registry.redis_client import (
    RedisStore,
    as_str,
    due_members,
    page_newest_first,
    redis_errors_as_unavailable,
)

_LIST_SCAN_BUDGET = 5000


def _compact(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))


class RedisBatchStore(RedisStore):
    """Implements domain.ports.batches.BatchStore on Redis 7."""

    SCRIPTS = "batches"

    def __init__(
        self,
        redis: Redis,
        keys: KeySpace,
        *,
        poll_s: float = 0.1,
        retention_ms: int = 7 * 24 * 3600 * 1000,
    ) -> None:
        self._retention_ms = retention_ms
        super().__init__(redis, keys)
        self._poll_s = poll_s

    async def create_batch(
        self, tenant_id: str, new: batch_models.NewBatch
    ) -> tuple[batch_models.Batch, bool]:
        keys = [
            *self._keys.batch_keys(tenant_id, new.batch_id),
            self._keys.batch_index(tenant_id),
            self._keys.batch_idempotency(tenant_id, new.idempotency_key),
        ]
        args: list[Any] = [
            new.batch_id,
            tenant_id,
            new.priority.value,
            new.idempotency_key,
            _compact(dict(new.metadata)),
            new.window_ms,
            new.session_id,
            self._retention_ms,
            *new.custom_ids,
        ]
        with redis_errors_as_unavailable():
            created, batch_id = await self._scripts.run("create", keys=keys, args=args)
            batch = await self.get_batch(tenant_id, str(batch_id))
            if batch is None and not int(created):
                # The key names a batch dropped after its retention: the key is free again.
                await self._redis.delete(keys[-1])
                created, batch_id = await self._scripts.run("create", keys=keys, args=args)
                batch = await self.get_batch(tenant_id, str(batch_id))
            if batch is None:  # pragma: no cover - only if the keys vanished meanwhile
                raise RuntimeError(f"batch {batch_id} vanished")
            if int(created):
                await self._redis.zadd(
                    self._keys.batch_expiry(shard_of(str(batch_id))),
                    {f"{tenant_id} {batch_id}": batch.expire_ms},
                )
        return batch, bool(int(created))

    async def find_by_idempotency_key(self, tenant_id: str, key: str) -> batch_models.Batch | None:
        with redis_errors_as_unavailable():
            batch_id = await self._redis.get(self._keys.batch_idempotency(tenant_id, key))
        return None if batch_id is None else await self.get_batch(tenant_id, str(batch_id))

    async def get_batch(self, tenant_id: str, batch_id: str) -> batch_models.Batch | None:
        with redis_errors_as_unavailable():
            fields: dict[str, str] = await self._redis.hgetall(  # type: ignore[assignment]
                self._keys.batch_keys(tenant_id, batch_id).hash
            )
        return _batch(batch_id, fields) if fields else None

    async def list_batches(
        self,
        tenant_id: str,
        *,
        limit: int,
        after: str | None,
        state: batch_models.BatchState | None,
    ) -> Page[batch_models.Batch]:
        async def load(ids: list[str]) -> list[batch_models.Batch | None]:
            pipe = self._redis.pipeline(transaction=False)
            for batch_id in ids:
                pipe.hgetall(self._keys.batch_keys(tenant_id, batch_id).hash)
            replies = await pipe.execute()
            return [
                _batch(batch_id, fields) if fields else None
                for batch_id, fields in zip(ids, replies, strict=True)
            ]

        with redis_errors_as_unavailable():
            return await page_newest_first(
                self._redis,
                self._keys.batch_index(tenant_id),
                after=after,
                limit=limit,
                budget=_LIST_SCAN_BUDGET,
                load=load,
                keep=lambda batch: state is None or batch.state is state,
            )

    async def start_item(
        self, tenant_id: str, batch_id: str, index: int, *, redelivery: bool
    ) -> batch_models.ItemStart:
        batch = self._keys.batch_keys(tenant_id, batch_id)
        with redis_errors_as_unavailable():
            started = await self._scripts.run(
                "start_item", keys=[batch.hash, batch.states], args=[index, 1 if redelivery else 0]
            )
        return batch_models.ItemStart(int(started))

    def _finish_args(self, index: int, outcome: batch_models.ItemOutcome) -> list[Any]:
        data = _compact(outcome.to_data())
        return [index, outcome.state.value, outcome.job_id, data, self._retention_ms]

    async def attach_job(
        self, tenant_id: str, batch_id: str, index: int, job_id: str, session_id: str
    ) -> bool:
        batch = self._keys.batch_keys(tenant_id, batch_id)
        keys = [batch.hash, batch.states, batch.jobs]
        with redis_errors_as_unavailable():
            ok = await self._scripts.run(
                "attach_job", keys=keys, args=[index, f"{job_id} {session_id}"]
            )
        return bool(int(ok))

    async def finish_item(
        self, tenant_id: str, batch_id: str, index: int, outcome: batch_models.ItemOutcome
    ) -> int | None:
        args = self._finish_args(index, outcome)
        with redis_errors_as_unavailable():
            seq = await self._scripts.run(
                "finish_item", keys=list(self._keys.batch_keys(tenant_id, batch_id)), args=args
            )
        return int(seq) or None

    async def start_items(
        self, items: Sequence[batch_models.ItemRef]
    ) -> list[batch_models.ItemStart]:
        def build(pipe: ScriptPipeline) -> None:
            for item in items:
                batch = self._keys.batch_keys(item.tenant_id, item.batch_id)
                pipe.run("start_item", keys=[batch.hash, batch.states], args=[item.index, 1])

        with redis_errors_as_unavailable():
            replies = await self._scripts.in_one_round_trip(build)
        return [batch_models.ItemStart(int(reply)) for reply in replies]

    async def attach_jobs(
        self, jobs: Sequence[tuple[batch_models.ItemRef, str, str]]
    ) -> list[bool]:
        def build(pipe: ScriptPipeline) -> None:
            for item, job_id, session_id in jobs:
                batch = self._keys.batch_keys(item.tenant_id, item.batch_id)
                keys = [batch.hash, batch.states, batch.jobs]
                pipe.run("attach_job", keys=keys, args=[item.index, f"{job_id} {session_id}"])

        with redis_errors_as_unavailable():
            replies = await self._scripts.in_one_round_trip(build)
        return [bool(int(reply)) for reply in replies]

    async def finish_items(
        self, items: Sequence[tuple[batch_models.ItemRef, batch_models.ItemOutcome]]
    ) -> list[int | None]:
        def build(pipe: ScriptPipeline) -> None:
            for item, outcome in items:
                keys = list(self._keys.batch_keys(item.tenant_id, item.batch_id))
                pipe.run("finish_item", keys=keys, args=self._finish_args(item.index, outcome))

        with redis_errors_as_unavailable():
            replies = await self._scripts.in_one_round_trip(build)
        return [int(reply) or None for reply in replies]

    async def stop_batch(
        self,
        tenant_id: str,
        batch_id: str,
        state: batch_models.BatchState,
        error: dict[str, object],
    ) -> tuple[batch_models.Batch | None, list[batch_models.RunningItem]]:
        mode = (
            batch_models.ItemState.EXPIRED
            if state is batch_models.BatchState.EXPIRED
            else batch_models.ItemState.CANCELLED
        )
        with redis_errors_as_unavailable():
            reply = await self._scripts.run(
                "stop",
                keys=list(self._keys.batch_keys(tenant_id, batch_id)),
                args=[mode.value, _compact({"error": error}), self._retention_ms],
            )
        if not int(reply[0]):
            return None, []
        running: list[batch_models.RunningItem] = []
        for i in range(1, len(reply), 2):
            job_id, _, session_id = str(reply[i + 1]).partition(" ")
            running.append(batch_models.RunningItem(int(reply[i]), job_id, session_id))
        return await self.get_batch(tenant_id, batch_id), running

    async def reopen_item(
        self, tenant_id: str, batch_id: str, index: int
    ) -> tuple[batch_models.BatchState | None, batch_models.ItemState | None]:
        with redis_errors_as_unavailable():
            state, item = await self._scripts.run(
                "reopen_item",
                keys=list(self._keys.batch_keys(tenant_id, batch_id)),
                args=[index, self._retention_ms],
            )
        return (
            batch_models.BatchState(state) if state else None,
            batch_models.ItemState(item) if item else None,
        )

    async def read_results(
        self, tenant_id: str, batch_id: str, after: int, *, limit: int, wait_s: float
    ) -> list[batch_models.ItemResult]:
        """Waiting polls (XRANGE every ``poll_s``) rather than blocking in XREAD: a blocked
        read would hold one of the shared pool's connections per open stream."""
        key = self._keys.batch_keys(tenant_id, batch_id).results
        deadline = time.monotonic() + max(wait_s, 0.0)
        while True:
            with redis_errors_as_unavailable():
                entries: list[Any] = await self._redis.xrange(  # type: ignore[assignment]
                    key, min=f"({after}-0", max="+", count=limit
                )
            left = deadline - time.monotonic()
            if entries or left <= 0:
                return [_result(batch_id, entry_id, fields) for entry_id, fields in entries]
            await asyncio.sleep(min(self._poll_s, left))

    async def due_for_expiry(self, *, limit: int) -> list[tuple[str, str]]:
        with redis_errors_as_unavailable():
            members = await due_members(
                self._redis, self._keys.hint_keys("batch-expiry"), limit=limit
            )
        due: list[tuple[str, str]] = []
        for _, member in members:
            tenant_id, _, batch_id = member.partition(" ")
            due.append((tenant_id, batch_id))
        return due

    async def forget_expiry(self, tenant_id: str, batch_id: str) -> None:
        with redis_errors_as_unavailable():
            # From its shard, and from the unsharded set of earlier releases it may be in.
            member = f"{tenant_id} {batch_id}"
            pipe = self._redis.pipeline(transaction=False)
            pipe.zrem(self._keys.batch_expiry(shard_of(batch_id)), member)
            pipe.zrem(self._keys.hint_keys("batch-expiry")[-1], member)
            await pipe.execute()

    async def scheduled_batches(self, *, limit: int) -> list[tuple[str, str]]:
        with redis_errors_as_unavailable():
            # Every shard in one pipeline (on a cluster, one request per master).
            pipe = self._redis.pipeline(transaction=False)
            for key in self._keys.hint_keys("batch-expiry"):
                pipe.zrange(key, 0, limit - 1)
            replies = await pipe.execute()
        scheduled: list[tuple[str, str]] = []
        for members in replies:
            for member in members:
                tenant_id, _, batch_id = as_str(member).partition(" ")
                scheduled.append((tenant_id, batch_id))
        return scheduled[:limit]

    async def running_items(self, tenant_id: str, batch_id: str) -> list[int]:
        with redis_errors_as_unavailable():
            states: dict[str, str] = await self._redis.hgetall(  # type: ignore[assignment]
                self._keys.batch_keys(tenant_id, batch_id).states
            )
        running = batch_models.ItemState.RUNNING.value
        return sorted(int(index) for index, state in states.items() if state == running)


def _result(batch_id: str, entry_id: str, fields: Mapping[str, str]) -> batch_models.ItemResult:
    return batch_models.ItemResult(
        batch_id=batch_id,
        custom_id=fields.get("c", ""),
        sequence=int(str(entry_id).partition("-")[0]),
        state=batch_models.ItemState(fields["s"]),
        job_id=fields.get("j", ""),
        finish_ms=int(fields.get("t", 0)),
        data=json.loads(fields.get("d") or "{}"),
    )


def _batch(batch_id: str, f: Mapping[str, str]) -> batch_models.Batch:
    def n(name: str) -> int:
        return int(f.get(name, 0))

    return batch_models.Batch(
        batch_id=batch_id,
        tenant_id=f["tenant"],
        state=batch_models.BatchState(f["state"]),
        priority=QueuePriority(f["priority"]),
        counts=batch_models.BatchCounts(
            total=n("total"),
            queued=n("queued"),
            running=n("running"),
            completed=n("completed"),
            failed=n("failed"),
            cancelled=n("cancelled"),
            expired=n("expired"),
        ),
        idempotency_key=f.get("idem", ""),
        metadata=json.loads(f.get("metadata") or "{}"),
        created_ms=n("created"),
        updated_ms=n("updated"),
        expire_ms=n("expire"),
        finish_ms=n("finish"),
        session_id=f.get("session", ""),
    )

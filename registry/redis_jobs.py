"""Jobs and session events in Redis (registry.base.JobStore).

A job is a hash under its tenant's hash tag, changed only by the Lua scripts in
registry.redis_job_scripts, which also keep the session's bookkeeping and append the event
(stream entry + pub/sub message) in the same atomic step. Two keys live outside the tenant's
slot and are only hints or lookups: the job index (job id -> tenant, session), written before
the job, and the deadline set the reaper scans; the scripts re-check everything they rely on.
A job enters the deadline set in the same pipeline as its start script, scored a little before
its first possible deadline by this process's clock: the reaper then looks at it early and moves
it to its real due time (REAP answers "later"), so no crash between two commands can leave a
job untimed, and a start costs one round trip.
A third, the set of tenants with jobs, tells ``count_unfinished`` which tenants' sets of queued,
pending and running jobs (kept by the scripts, in the tenant's slot) to count; it drops the
tenants found with nothing unfinished, so the set follows the active tenants.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from domain.jobs import (
    UNFINISHED_STATES,
    ActivateOutcome,
    EventDraft,
    FinishOutcome,
    IfBusy,
    Job,
    JobLimits,
    JobState,
    NewJob,
    Notice,
    NoticeOutcome,
    SessionEvent,
    StartedJob,
    StartRefused,
    Verdict,
)
from domain.models import Service, TokenUsage, WorkKind
from domain.usage import USAGE_RETENTION_MS
from registry import redis_job_scripts as scripts
from registry.event_codec import decode_envelope
from registry.keys import KeySpace
from registry.redis_client import as_str, redis_errors_as_unavailable

# How much earlier than its first possible deadline (by this process's clock) a new job is
# scored in the deadline set: covers clock skew between this process and Redis.
_EARLY_DEADLINE_MARGIN_MS = 2_000


def _early_due_ms(limits: JobLimits, *, may_queue: bool) -> int:
    """A score at or before the deadline the start script will give a new job, so the reaper
    looks at it no later than it is due."""
    first = min(limits.deadline_ms, limits.heartbeat_ms)
    if may_queue:
        first = min(first, limits.queue_timeout_ms)
    return int(time.time() * 1000) + first - _EARLY_DEADLINE_MARGIN_MS


# Locations (job id -> tenant, session) this process remembers for the jobs it started or
# heard of, so each notice of an unfinished job skips the GET of the job index. A job is
# forgotten when it ends here; jobs ending on another replica leave oldest first. About 300
# bytes an entry: 3 MB at the bound, which covers 10,000 jobs in flight on this replica (a job
# beyond it costs one GET per notice). It was 100,000 (30 MB), filled by finished jobs only:
# at 20 chats/s it grew for 80 minutes and looked like a leak.
_INDEX_CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class EventLogConfig:
    """Bounds of each session's event log."""

    max_events: int
    ttl_ms: int


def _compact(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))


class RedisJobStore:
    """registry.base.JobStore on Redis."""

    def __init__(self, redis: Redis, keys: KeySpace, log: EventLogConfig) -> None:
        self._redis = redis
        self._keys = keys
        self._log = log
        self._start = redis.register_script(scripts.START)
        self._notice = redis.register_script(scripts.NOTICE)
        self._finish = redis.register_script(scripts.FINISH)
        self._reap = redis.register_script(scripts.REAP)
        self._activate = redis.register_script(scripts.ACTIVATE)
        self._prune_tenants = redis.register_script(scripts.PRUNE_TENANTS)
        # job id -> (tenant, session): immutable once written, so safe to cache.
        self._index: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def _job_keys(self, tenant_id: str, session_id: str, job_id: str) -> list[str]:
        k = self._keys
        return [
            k.job(tenant_id, job_id),
            k.session(tenant_id, session_id),
            k.session_pending(tenant_id, session_id),
            k.session_event_seq(tenant_id, session_id),
            k.session_events(tenant_id, session_id),
            k.jobs_in_state(tenant_id, JobState.PENDING.value),
            k.jobs_in_state(tenant_id, JobState.RUNNING.value),
            k.session_line(tenant_id, session_id),
            k.jobs_in_state(tenant_id, JobState.QUEUED.value),
        ]

    def _event(self, session_id: str, reply: list[Any]) -> SessionEvent:
        return decode_envelope(session_id, int(reply[1]), int(reply[2]), as_str(reply[3]))

    def _remember(self, job_id: str, tenant_id: str, session_id: str) -> None:
        self._index[job_id] = (tenant_id, session_id)
        if len(self._index) > _INDEX_CACHE_SIZE:
            self._index.popitem(last=False)

    def _forget(self, job_id: str) -> None:
        """The job ended: its notices are late ones now, which may pay for the GET."""
        self._index.pop(job_id, None)

    @property
    def remembered_locations(self) -> int:
        return len(self._index)

    async def _locate(self, job_id: str) -> tuple[str, str] | None:
        found = self._index.get(job_id)
        if found is not None:
            return found
        with redis_errors_as_unavailable():
            raw = await self._redis.get(self._keys.job_index(job_id))
        if raw is None:
            return None
        tenant_id, _, session_id = as_str(raw).partition(" ")
        self._remember(job_id, tenant_id, session_id)
        return tenant_id, session_id

    async def start_job(
        self, tenant_id: str, new: NewJob, limits: JobLimits, *, if_busy: IfBusy, hold: bool = False
    ) -> StartedJob | StartRefused:
        keys = self._keys
        accepted = {
            "service": new.service.value,
            "kind": new.kind.value,
            "content": new.content,
            "model": new.model,
        }
        index_ttl = limits.queue_timeout_ms + limits.deadline_ms + limits.retention_ms
        deadline_member = f"{tenant_id} {new.session_id} {new.job_id}"
        early_due = _early_due_ms(limits, may_queue=hold or if_busy is IfBusy.HOLD)
        with redis_errors_as_unavailable():
            # One round trip; the index is written first so that a notice can never find a job
            # it cannot locate.
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(keys.job_index(new.job_id), f"{tenant_id} {new.session_id}", px=index_ttl)
            pipe.zadd(keys.job_deadlines(), {deadline_member: early_due})
            await self._start(
                keys=self._job_keys(tenant_id, new.session_id, new.job_id),
                args=[
                    new.job_id,
                    new.session_id,
                    new.service.value,
                    new.kind.value,
                    json.dumps(new.request_id),
                    new.agent_id,
                    new.model,
                    _compact(accepted)[:-1],
                    limits.deadline_ms,
                    limits.heartbeat_ms,
                    limits.retention_ms,
                    if_busy.value,
                    self._log.max_events,
                    self._log.ttl_ms,
                    keys.session_channel(tenant_id, new.session_id),
                    new.cache_key,
                    limits.queue_timeout_ms,
                    "1" if hold else "0",
                ],
                client=pipe,
            )
            # After the script, which counts the job: count_unfinished's pruning can then
            # never drop the tenant of a counted job (PRUNE_TENANTS).
            pipe.sadd(keys.job_tenants(), tenant_id)
            _, _, reply, _ = await pipe.execute()
            status = as_str(reply[0])
            if status != "ok":
                cleanup = self._redis.pipeline(transaction=False)
                cleanup.delete(keys.job_index(new.job_id))
                cleanup.zrem(keys.job_deadlines(), deadline_member)
                await cleanup.execute()
                return StartRefused(status)
            self._remember(new.job_id, tenant_id, new.session_id)
            event = self._event(new.session_id, reply)
        job = new.recorded(tenant_id, event.time_ms, limits, queued=bool(event.data.get("queued")))
        return StartedJob(job, event)

    async def activate_job(self, tenant_id: str, job_id: str, limits: JobLimits) -> ActivateOutcome:
        located = await self._locate(job_id)
        if located is None or located[0] != tenant_id:
            return ActivateOutcome.UNKNOWN_JOB
        session_id = located[1]
        with redis_errors_as_unavailable():
            reply = await self._activate(
                keys=self._job_keys(tenant_id, session_id, job_id),
                args=[job_id, limits.deadline_ms, limits.heartbeat_ms, limits.retention_ms],
            )
            outcome = ActivateOutcome(as_str(reply[0]))
            if outcome is ActivateOutcome.FINAL:
                self._forget(job_id)
            elif outcome is ActivateOutcome.STARTED:
                # The reaper must look at the job by its new deadline, not the queue timeout.
                await self._redis.zadd(
                    self._keys.job_deadlines(),
                    {f"{tenant_id} {session_id} {job_id}": int(reply[1])},
                )
        return outcome

    async def apply_notice(self, notice: Notice, limits: JobLimits) -> NoticeOutcome:
        located = await self._locate(notice.job_id)
        if located is None:
            return NoticeOutcome(Verdict.UNKNOWN_JOB)
        tenant_id, session_id = located
        if tenant_id != notice.tenant_id:
            return NoticeOutcome(Verdict.WRONG_TENANT)
        usage = notice.usage
        with redis_errors_as_unavailable():
            reply = await self._notice(
                keys=self._job_keys(tenant_id, session_id, notice.job_id),
                args=[
                    notice.job_id,
                    notice.service.value,
                    notice.sequence,
                    notice.event.value,
                    _compact(notice.data),
                    limits.heartbeat_ms,
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    usage.total_tokens,
                    limits.retention_ms,
                    self._log.max_events,
                    self._log.ttl_ms,
                    self._keys.session_channel(tenant_id, session_id),
                    self._keys.usage_prefix(tenant_id),
                    USAGE_RETENTION_MS,
                ],
            )
        verdict = Verdict(as_str(reply[0]))
        if verdict is Verdict.JOB_FINISHED:
            self._forget(notice.job_id)
        if verdict is not Verdict.ACCEPTED:
            return NoticeOutcome(verdict)
        event = self._event(session_id, reply)
        if event.kind.is_final:
            self._forget(notice.job_id)
        return NoticeOutcome(verdict, event)

    async def finish_job(
        self, tenant_id: str, job_id: str, draft: EventDraft, limits: JobLimits
    ) -> tuple[FinishOutcome, SessionEvent | None]:
        located = await self._locate(job_id)
        if located is None or located[0] != tenant_id:
            return FinishOutcome.UNKNOWN_JOB, None
        session_id = located[1]
        with redis_errors_as_unavailable():
            reply = await self._finish(
                keys=self._job_keys(tenant_id, session_id, job_id),
                args=[
                    job_id,
                    draft.kind.value,
                    _compact(draft.data),
                    limits.retention_ms,
                    self._log.max_events,
                    self._log.ttl_ms,
                    self._keys.session_channel(tenant_id, session_id),
                ],
            )
        outcome = FinishOutcome(as_str(reply[0]))
        if outcome is not FinishOutcome.UNKNOWN_JOB:
            self._forget(job_id)
        if outcome is not FinishOutcome.DONE:
            return outcome, None
        return outcome, self._event(session_id, reply)

    async def get_job(self, tenant_id: str, job_id: str) -> Job | None:
        with redis_errors_as_unavailable():
            fields = await self._redis.hgetall(self._keys.job(tenant_id, job_id))
        if not fields:
            return None
        f = {as_str(k): as_str(v) for k, v in fields.items()}
        return Job(
            job_id=job_id,
            tenant_id=tenant_id,
            session_id=f["session"],
            service=Service(f["service"]),
            kind=WorkKind(f["kind"]),
            state=JobState(f["state"]),
            request_id=json.loads(f["request"]),
            created_at_ms=int(f["created"]),
            updated_at_ms=int(f["updated"]),
            deadline_ms=int(f["deadline"]),
            heartbeat_deadline_ms=int(f["hb"]),
            last_notice_sequence=int(f["nseq"]),
            usage=TokenUsage(int(f["ptok"]), int(f["ctok"]), int(f["ttok"])),
            agent_id=f.get("agent", ""),
            model=f.get("model", ""),
            cache_key=f.get("ckey", ""),
        )

    async def count_unfinished(self) -> dict[JobState, int]:
        """SMEMBERS with TIME, then the ZCOUNTs of each tenant that started a job, in one pipeline:
        members scored before now are jobs whose hash expired unfinished, not counted. Tenants
        found with nothing unfinished are dropped from the set (a script re-checks each)."""
        keys = self._keys
        counts = dict.fromkeys(UNFINISHED_STATES, 0)
        with redis_errors_as_unavailable():
            read = self._redis.pipeline(transaction=False)
            read.smembers(keys.job_tenants())
            read.time()
            members, (seconds, micros) = await read.execute()
            tenants = [as_str(t) for t in members]
            if not tenants:
                return counts
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            pipe = self._redis.pipeline(transaction=False)
            for tenant_id in tenants:
                for state in UNFINISHED_STATES:
                    pipe.zcount(keys.jobs_in_state(tenant_id, state.value), now_ms, "+inf")
            replies = [int(n) for n in await pipe.execute()]
            per_tenant = len(UNFINISHED_STATES)
            idle = [
                tenant_id
                for i, tenant_id in enumerate(tenants)
                if not any(replies[i * per_tenant : (i + 1) * per_tenant])
            ]
            if idle:
                await self._prune_tenants(
                    keys=[
                        keys.job_tenants(),
                        *(
                            keys.jobs_in_state(tenant_id, state.value)
                            for tenant_id in idle
                            for state in UNFINISHED_STATES
                        ),
                    ],
                    args=idle,
                )
        for i, n in enumerate(replies):
            counts[UNFINISHED_STATES[i % per_tenant]] += n
        return counts

    async def reap_expired(self, limits: JobLimits, *, limit: int) -> list[SessionEvent]:
        deadlines = self._keys.job_deadlines()
        events: list[SessionEvent] = []
        with redis_errors_as_unavailable():
            seconds, micros = await self._redis.time()
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            due = await self._redis.zrangebyscore(deadlines, "-inf", now_ms, start=0, num=limit)
            for raw in due:
                member = as_str(raw)
                tenant_id, session_id, job_id = member.split(" ", 2)
                reply = await self._reap(
                    keys=self._job_keys(tenant_id, session_id, job_id),
                    args=[
                        job_id,
                        limits.retention_ms,
                        self._log.max_events,
                        self._log.ttl_ms,
                        self._keys.session_channel(tenant_id, session_id),
                    ],
                )
                status = as_str(reply[0])
                if status == "later":
                    await self._redis.zadd(deadlines, {member: int(reply[1])}, xx=True)
                    continue
                await self._redis.zrem(deadlines, member)
                self._forget(job_id)
                if status == "done":
                    events.append(self._event(session_id, reply))
        return events

"""Jobs and session events in Redis (domain.ports.jobs.JobStore).

A job is a hash under its tenant's hash tag, changed only by the Lua scripts in
registry/lua/jobs/, which also keep the session's bookkeeping and append the event
(stream entry + pub/sub message) in the same atomic step. Two keys live outside the tenant's
slot and are only hints or lookups: the job index (job id -> tenant, session), written before
the job, and the deadline set the reaper scans; the scripts re-check everything they rely on.
Each hint set is split into shards (registry.keys ``INDEX_SHARDS``, by job id), each in a slot
of its own: a job's hints go to its shard, and every scan reads all shards in one pipeline.
On a cluster a pipeline's commands for different masters are sent in parallel, not in order;
nothing here relies on their order across slots, only within the tenant's slot.
A job enters the deadline set in the same pipeline as its start script, scored a little before
its first possible deadline by this process's clock: the reaper then looks at it early and moves
it to its real due time (REAP answers "later"), so no crash between two commands can leave a
job untimed, and a start costs one round trip.
Hints are written never later than they are (ZADD LT) except by the scan that found them due.
A job's hand-off to its service is tracked the same way: the start script keeps the job's work
spec and a hand-off lease in the job hash, and the start pipeline scores the job in the
hand-off set at the end of that lease; the process handing it over removes it once the service
took it (``handoff_done``), and ``claim_handoffs`` (any process) finds the jobs whose hand-off
was interrupted. A QUEUED job's enqueue on the work queue is its first hand-off, tracked alike
(``enqueue_done`` confirms it, leaving the entry to the claim, which drops it: removing it here
could drop the entry of an activation that came first); the activate script's pipeline scores
the job again when its turn comes.
A FINISHING job (its plan appends history: domain.plans) is tracked in a fourth set the same
way, ``job_finalizes``, scored at the end of its finalize lease: the pipeline of a completed
notice scores the job there with the notice script, which turns it FINISHING or not (an entry
for a job that completed outright is dropped by the claim that finds nothing to do), unless the
job cannot turn FINISHING (an embedding, or a job this process started without history to
append); completing or failing it drops the entry in the same pipeline.
A third, the set of tenants with jobs (sharded by tenant: tenant -> listing), tells
``count_unfinished`` which tenants' sets of queued, pending and running jobs (kept by the
scripts, in the tenant's slot) to count. A tenant's listing (a key in its slot, the id of the
job that listed it) is set after the start script in the same pipeline and slot; when it is new,
the tenant goes into its shard under it. ``count_unfinished`` unlists the tenants found with
nothing unfinished one slot at a time (jobs/unlist_tenant.lua, then jobs/drop_tenant.lua under
the listing read), so the set follows the active tenants and no script spans two slots.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from domain import jobs
from domain.agents import AgentConfig
from domain.errors import DataLoss
from domain.models import Service, SessionState, TokenUsage, WorkKind
from domain.plans import OrchestrationPlan, ServiceCall
from domain.ports.queue import QueuePriority
from domain.ports.usage import day_number
from domain.service_caps import LimitKind, LimitReached
from domain.usage import USAGE_RETENTION_MS
from registry.event_codec import decode_envelope
from registry.keys import INDEX_SHARDS, KeySpace, shard_of
from registry.lua_scripts import ScriptPipeline, scripts_lost
from registry.redis_client import (
    RedisStore,
    as_str,
    due_members,
    pairs_to_dict,
    redis_errors_as_unavailable,
    time_ms,
    unavailable_from,
)

log = logging.getLogger(__name__)

# How much earlier than its first possible deadline (by this process's clock) a new job is
# scored in the deadline set: covers clock skew between this process and Redis.
_EARLY_DEADLINE_MARGIN_MS = 2_000


def _early_due_ms(limits: jobs.JobLimits, *, may_queue: bool) -> int:
    """A score at or before the deadline the start script will give a new job, so the reaper
    looks at it no later than it is due."""
    first = min(limits.deadline_ms, limits.heartbeat_ms)
    if may_queue:
        first = min(first, limits.queue_timeout_ms)
    return _now_ms() + first - _EARLY_DEADLINE_MARGIN_MS


def _now_ms() -> int:
    return int(time.time() * 1000)


# Locations (job id -> tenant, session) this process remembers for the jobs it started or
# heard of, so each notice of an unfinished job skips the GET of the job index. A job is
# forgotten when it ends here; jobs ending on another replica leave oldest first. About 300
# bytes an entry: 3 MB at the bound, which covers 10,000 jobs in flight on this replica (a job
# beyond it costs one GET per notice). It was 100,000 (30 MB), filled by finished jobs only:
# at 20 chats/s it grew for 80 minutes and looked like a leak.
_INDEX_CACHE_SIZE = 10_000
# The notice script's answers after which the job has no hand-off record (it dropped it, or the
# job had ended).
_HANDED_OVER = frozenset(("accepted", "finishing", "job_finished"))
# How long a day's set of tenants that started jobs is kept (registry.keys job_tenants_of_day).
_DAY_TENANTS_TTL_MS = 3 * 86_400_000
# How long a tenant's listing in the set of tenants with jobs lasts (registry.keys
# tenant_listing): the longest a tenant stays uncounted when a process dies between listing it
# and putting it in its shard.
_TENANT_LISTING_TTL_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class EventLogConfig:
    """Bounds of each session's event log."""

    max_events: int
    ttl_ms: int
    # Also PUBLISH on the classic channel of releases before sharded pub/sub (a rolling
    # upgrade; ORCH_EVENT_PUBSUB_LEGACY).
    legacy_channel: bool = False


def _final_event(session_id: str, kept: str) -> jobs.SessionEvent:
    """A job's kept final event, stored as "<sequence> <time> <envelope>"."""
    sequence, time_ms, envelope = kept.split(" ", 2)
    return decode_envelope(session_id, int(sequence), int(time_ms), envelope)


def _member(tenant_id: str, session_id: str, job_id: str) -> str:
    """A job's member in the deadline, hand-off and finalize sets: ``<tenant> <session> <job>``."""
    return f"{tenant_id} {session_id} {job_id}"


def _compact(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))


class RedisJobStore(RedisStore):
    """domain.ports.jobs.JobStore on Redis."""

    SCRIPTS = "jobs"

    def __init__(
        self, redis: Redis, keys: KeySpace, log: EventLogConfig, *, session_retention_ms: int
    ) -> None:
        """``session_retention_ms``: how long a session that expired is kept (the session
        store's), for the session read of ``start_on_session``."""
        super().__init__(redis, keys)
        self._log = log
        self._session_retention_ms = session_retention_ms
        # job id -> (tenant, session): immutable once written, so safe to cache.
        self._index: OrderedDict[str, tuple[str, str]] = OrderedDict()
        # Ids of the remembered jobs this process started knowing their plan appends nothing
        # after the work: their completed notices need no finalize hint.
        self._no_finalize: set[str] = set()
        # The jobs this process started or activated whose hand-off entry (in the hand-off
        # set) may still be there: job id -> its member. A notice of one applied here dropped
        # its hand-off record in the notice script (the hand-off needs no confirmation of its
        # own, domain.handoff_upkeep): its entry is then removed by the next pipeline this
        # store sends (``_hint_drops``), without a round trip of its own. If none is sent, or
        # the one that carries it fails, the recovery's claim finds the job handed over and
        # drops the entry, as for a lost confirmation.
        self._hinted: OrderedDict[str, str] = OrderedDict()
        self._hint_drops: list[tuple[str, str]] = []  # (job id, member)

    def _log_args(self, tenant_id: str, session_id: str) -> list[str | int]:
        """The ARGV a job script appends the session's event with (maxlen, log_ttl_ms,
        channel: prelude/jobs.lua's ``append``)."""
        channel = self._keys.event_publish_channel(
            tenant_id, session_id, legacy=self._log.legacy_channel
        )
        return [self._log.max_events, self._log.ttl_ms, channel]

    def _job_keys(self, tenant_id: str, session_id: str, job_id: str) -> list[str]:
        k = self._keys
        return [
            k.job(tenant_id, job_id),
            k.session(tenant_id, session_id),
            k.session_pending(tenant_id, session_id),
            k.session_event_seq(tenant_id, session_id),
            k.session_events(tenant_id, session_id),
            k.jobs_in_state(tenant_id, jobs.JobState.PENDING.value),
            k.jobs_in_state(tenant_id, jobs.JobState.RUNNING.value),
            k.session_line(tenant_id, session_id),
            k.jobs_in_state(tenant_id, jobs.JobState.QUEUED.value),
            k.jobs_in_state(tenant_id, jobs.JobState.FINISHING.value),
            k.limits_prefix(tenant_id),
        ]

    def _event(self, session_id: str, reply: list[Any]) -> jobs.SessionEvent:
        return decode_envelope(session_id, int(reply[1]), int(reply[2]), as_str(reply[3]))

    def _remember(self, job_id: str, tenant_id: str, session_id: str) -> None:
        self._index[job_id] = (tenant_id, session_id)
        if len(self._index) > _INDEX_CACHE_SIZE:
            dropped, _ = self._index.popitem(last=False)
            self._no_finalize.discard(dropped)

    def _forget(self, job_id: str) -> None:
        """The job ended: its notices are late ones now, which may pay for the GET."""
        self._index.pop(job_id, None)
        self._no_finalize.discard(job_id)

    @property
    def remembered_locations(self) -> int:
        return len(self._index)

    def _hint(self, job_id: str, member: str) -> None:
        """The job's hand-off entry was written by this process."""
        self._hinted[job_id] = member
        if len(self._hinted) > _INDEX_CACHE_SIZE:  # the oldest is left to the claim
            self._hinted.popitem(last=False)

    def _handed_over(self, job_id: str) -> None:
        """A notice of the job was applied (its hand-off record is gone): its hand-off entry,
        if this process wrote it, goes with the next pipeline."""
        member = self._hinted.pop(job_id, None)
        if member is not None:
            self._hint_drops.append((job_id, member))

    def _queue_hint_drops(self, commands: Any) -> None:
        """Remove the hand-off entries of jobs handed over (``_handed_over``) in the pipeline
        ``commands`` being built (one ZREM per shard)."""
        if not self._hint_drops:
            return
        drops, self._hint_drops = self._hint_drops, []
        by_key: dict[str, list[str]] = {}
        for job_id, member in drops:
            by_key.setdefault(self._keys.job_handoffs(shard_of(job_id)), []).append(member)
        for key, members in by_key.items():
            commands.zrem(key, *members)

    async def _locate(self, job_id: str) -> tuple[str, str] | None:
        found = self._index.get(job_id)
        if found is not None:
            return found
        with redis_errors_as_unavailable():
            raw = await self._redis.get(self._keys.job_index(job_id))
        return self._located(job_id, raw)

    def _located(self, job_id: str, raw: bytes | str | None) -> tuple[str, str] | None:
        """The (tenant, session) of a job index entry read from Redis, remembered; None when
        the job has none."""
        if raw is None:
            return None
        tenant_id, _, session_id = as_str(raw).partition(" ")
        self._remember(job_id, tenant_id, session_id)
        return tenant_id, session_id

    async def start_job(
        self,
        tenant_id: str,
        new: jobs.NewJob,
        limits: jobs.JobLimits,
        *,
        if_busy: jobs.IfBusy,
        hold: bool = False,
    ) -> jobs.StartedJob | jobs.StartRefused | LimitReached:
        started = await self._start(tenant_id, new, limits, if_busy, hold, read_session=False)
        assert not isinstance(started, jobs.SessionNotOpen)
        return started

    async def start_on_session(
        self,
        tenant_id: str,
        new: jobs.NewJob,
        limits: jobs.JobLimits,
        *,
        if_busy: jobs.IfBusy,
        hold: bool = False,
    ) -> jobs.StartedJob | jobs.SessionNotOpen | jobs.StartRefused | LimitReached:
        assert not new.parent_job_id, "an internal call's job starts with start_job"
        return await self._start(tenant_id, new, limits, if_busy, hold, read_session=True)

    async def _start(
        self,
        tenant_id: str,
        new: jobs.NewJob,
        limits: jobs.JobLimits,
        if_busy: jobs.IfBusy,
        hold: bool,
        *,
        read_session: bool,
    ) -> jobs.StartedJob | jobs.SessionNotOpen | jobs.StartRefused | LimitReached:
        """The start script's round trip; ``read_session``: with the session's read (the
        job's agent is then the session's)."""
        keys = self._keys
        accepted = {
            "service": new.service.value,
            "kind": new.kind.value,
            "content": new.content,
            "model": new.model,
        }
        index_ttl = limits.queue_timeout_ms + limits.deadline_ms + limits.retention_ms
        deadline_member = _member(tenant_id, new.session_id, new.job_id)
        job_shard, tenant_shard = shard_of(new.job_id), shard_of(tenant_id)
        early_due = _early_due_ms(limits, may_queue=hold or if_busy is jobs.IfBusy.HOLD)
        spec = _compact({"c": new.content, "l": list(new.collections), "p": new.priority.value})
        plan = new.plan
        appends = plan is not None and plan.appends_history

        def build(pipe: ScriptPipeline) -> None:
            commands = pipe.commands
            self._queue_hint_drops(commands)
            # The index is written first so that a notice can never find a job it cannot
            # locate. Job ids are the orchestrator's own (UUIDv7, or derived from a batch's):
            # an id is not refused for another tenant or session, which would cost a round
            # trip of its own (the index is outside the tenant's slot).
            commands.set(keys.job_index(new.job_id), f"{tenant_id} {new.session_id}", px=index_ttl)
            # Never later (LT): an entry already there is the existing job's own, due earlier.
            commands.zadd(keys.job_deadlines(job_shard), {deadline_member: early_due}, lt=True)
            # A queued job's first hand-off is its enqueue: checked alike.
            commands.zadd(
                keys.job_handoffs(job_shard),
                {deadline_member: _now_ms() + limits.handoff_grace_ms},
                lt=True,
            )
            # Where GetStats finds the tenants whose tokens of today to add up.
            day_tenants = keys.job_tenants_of_day(tenant_shard, day_number(_now_ms()))
            commands.sadd(day_tenants, tenant_id)
            commands.pexpire(day_tenants, _DAY_TENANTS_TTL_MS)
            pipe.run(
                "start",
                keys=[
                    *self._job_keys(tenant_id, new.session_id, new.job_id),
                    keys.tenant_jobs(tenant_id),
                ],
                args=[
                    new.job_id,
                    new.session_id,
                    new.service.value,
                    new.kind.value,
                    json.dumps(new.request_id),
                    new.agent_id,
                    new.model,
                    _compact(accepted),
                    limits.deadline_ms,
                    limits.heartbeat_ms,
                    limits.retention_ms,
                    if_busy.value,
                    *self._log_args(tenant_id, new.session_id),
                    new.cache_key,
                    limits.queue_timeout_ms,
                    "1" if hold else "0",
                    spec,
                    limits.handoff_grace_ms,
                    "1" if new.keep_final else "0",
                    _compact(plan.to_json()) if plan is not None else "",
                    _compact(new.agent.to_json()) if new.agent is not None else "",
                    "1" if appends else "0",
                    new.traceparent,
                    new.parent_job_id,
                    limits.max_internal_calls,
                    keys.job(tenant_id, ""),
                    *_cap_args(tenant_id, limits),
                    self._session_retention_ms if read_session else "",
                ],
            )
            # After the script, which counts the job, in the tenant's slot (so in order with
            # it, on a cluster too): the tenant's listing, made anew when it is missing (a
            # first job, or one after count_unfinished unlisted the tenant).
            # SET NX GET: the listing there before, or none; this job's own when the pipeline
            # is sent again (after a NOSCRIPT reply, this command ran the first time).
            commands.set(
                keys.tenant_listing(tenant_id),
                new.job_id,
                nx=True,
                get=True,
                px=_TENANT_LISTING_TTL_MS,
            )

        with redis_errors_as_unavailable():
            *_, reply, listing = await self._scripts.in_one_round_trip(build)
            if listing is None or as_str(listing) == new.job_id:
                # The listing is new: the tenant goes into its shard under it. Crashing
                # before this leaves the tenant uncounted until the listing expires.
                await self._redis.hset(keys.job_tenants(tenant_shard), tenant_id, new.job_id)
            status = as_str(reply[0])
            if status == jobs.StartRefused.JOB_EXISTS.value:
                # The index and the hints are the existing job's own (the same id, tenant and
                # session; moved earlier at most): they stay.
                return jobs.StartRefused.JOB_EXISTS
            if status != "ok":
                cleanup = self._redis.pipeline(transaction=False)
                cleanup.delete(keys.job_index(new.job_id))
                cleanup.zrem(keys.job_deadlines(job_shard), deadline_member)
                cleanup.zrem(keys.job_handoffs(job_shard), deadline_member)
                await cleanup.execute()
                if status == "limited":
                    return _limit_reached(reply)
                if status == jobs.StartRefused.SESSION_NOT_OPEN.value and read_session:
                    return jobs.SessionNotOpen(SessionState(as_str(reply[1])))
                return jobs.StartRefused(status)
            self._remember(new.job_id, tenant_id, new.session_id)
            if not appends:
                self._no_finalize.add(new.job_id)
            event = self._event(new.session_id, reply)
        queued = bool(event.data.get("queued"))
        if not queued:  # a queued job's entry is its enqueue's, left to the claim
            self._hint(new.job_id, deadline_member)
        if read_session:
            new = dataclasses.replace(new, agent_id=as_str(reply[4]))
        job = new.recorded(tenant_id, event.time_ms, limits, queued=queued)
        return jobs.StartedJob(job, event)

    async def activate_job(
        self, tenant_id: str, job_id: str, limits: jobs.JobLimits
    ) -> jobs.ActivateOutcome | LimitReached:
        located = await self._locate(job_id)
        if located is None or located[0] != tenant_id:
            return jobs.ActivateOutcome.UNKNOWN_JOB
        session_id = located[1]
        member = _member(tenant_id, session_id, job_id)

        # One round trip, as a start: the reaper must look at a started job by its new
        # deadline (not the queue timeout) and its hand-off is now due to be confirmed, so both
        # hints are written with the script, whatever it answers, but never later (LT): a job
        # the script did not start (a redelivered work item of a started job) keeps hints at
        # or before its real deadline and lease, and is at most looked at early (the reaper and
        # the claim re-check it).
        def build(pipe: ScriptPipeline) -> None:
            pipe.run(
                "activate",
                keys=self._job_keys(tenant_id, session_id, job_id),
                args=[
                    job_id,
                    limits.deadline_ms,
                    limits.heartbeat_ms,
                    limits.retention_ms,
                    limits.handoff_grace_ms,
                    *_cap_args(tenant_id, limits),
                ],
            )
            shard = shard_of(job_id)
            pipe.commands.zadd(
                self._keys.job_deadlines(shard),
                {member: _early_due_ms(limits, may_queue=False)},
                lt=True,
            )
            pipe.commands.zadd(
                self._keys.job_handoffs(shard),
                {member: _now_ms() + limits.handoff_grace_ms},
                lt=True,
            )

        with redis_errors_as_unavailable():
            reply = (await self._scripts.in_one_round_trip(build))[0]
        if as_str(reply[0]) == "limited":
            return _limit_reached(reply)
        outcome = jobs.ActivateOutcome(as_str(reply[0]))
        if outcome is jobs.ActivateOutcome.FINAL:
            self._forget(job_id)
        elif outcome is jobs.ActivateOutcome.STARTED:
            self._hint(job_id, member)
        return outcome

    async def renew_handoff(self, tenant_id: str, job_id: str, limits: jobs.JobLimits) -> bool:
        located = await self._locate(job_id)
        if located is None or located[0] != tenant_id:
            return False
        member = _member(tenant_id, located[1], job_id)

        def build(pipe: ScriptPipeline) -> None:
            pipe.run(
                "renew_handoff",
                keys=[self._keys.job(tenant_id, job_id)],
                args=[limits.handoff_grace_ms],
            )
            # Only an entry still there moves (XX): a finished hand-off's stays gone. A
            # FINISHING job's finalize lease is in the other set.
            shard = shard_of(job_id)
            for hints in (self._keys.job_handoffs(shard), self._keys.job_finalizes(shard)):
                pipe.commands.zadd(hints, {member: _now_ms() + limits.handoff_grace_ms}, xx=True)

        with redis_errors_as_unavailable():
            lease, _, _ = await self._scripts.in_one_round_trip(build)
        return int(lease) > 0

    async def handoff_done(self, tenant_id: str, job_id: str) -> None:
        await self.handoffs_done([(tenant_id, job_id)])

    async def handoffs_done(self, done: Sequence[tuple[str, str]]) -> None:
        members: list[tuple[str, str, str]] = []
        for tenant_id, job_id in done:
            located = await self._locate(job_id)
            if located is not None and located[0] == tenant_id:
                members.append((tenant_id, job_id, _member(tenant_id, located[1], job_id)))
        if not members:
            return
        with redis_errors_as_unavailable():
            pipe = self._redis.pipeline(transaction=False)
            self._queue_hint_drops(pipe)
            for tenant_id, job_id, _ in members:
                pipe.hdel(self._keys.job(tenant_id, job_id), "hol", "hoa", "hoq")
            for _, job_id, member in members:
                self._hinted.pop(job_id, None)
                pipe.zrem(self._keys.job_handoffs(shard_of(job_id)), member)
            await pipe.execute()

    async def enqueue_done(self, tenant_id: str, job_id: str) -> None:
        # The hand-off set's entry stays: the claim drops it (an activation may have scored it
        # anew already).
        with redis_errors_as_unavailable():
            await self._redis.hdel(self._keys.job(tenant_id, job_id), "hoq")

    async def claim_handoffs(
        self, limits: jobs.JobLimits, *, limit: int
    ) -> list[jobs.HandoffClaim]:
        failed_data = _compact(jobs.handoff_failed_data("{service}", "{attempts}"))
        finalize_failed = _compact(jobs.finalize_failed_data("{attempts}"))
        claims: list[jobs.HandoffClaim] = []
        with redis_errors_as_unavailable():
            for index in ("job-handoffs", "job-finalizes"):
                due = await due_members(
                    self._redis, self._keys.hint_keys(index), limit=limit - len(claims)
                )
                for hints, member in due:
                    tenant_id, session_id, job_id = member.split(" ", 2)
                    reply = await self._scripts.run(
                        "claim_handoff",
                        keys=self._job_keys(tenant_id, session_id, job_id),
                        args=[
                            job_id,
                            limits.handoff_grace_ms,
                            limits.handoff_attempts,
                            limits.retention_ms,
                            *self._log_args(tenant_id, session_id),
                            failed_data,
                            finalize_failed,
                        ],
                    )
                    status = as_str(reply[0])
                    if status in ("gone", "done", "exhausted", "finalize_exhausted"):
                        await self._redis.zrem(hints, member)
                    else:
                        # Looked at again when the lease (new, or still held) runs out.
                        await self._redis.zadd(hints, {member: int(reply[1])}, xx=True)
                    if status in ("gone", "done", "later"):
                        continue
                    if status.endswith("exhausted"):
                        self._forget(job_id)
                    claims.append(_claim_from_reply(tenant_id, job_id, reply))
                if len(claims) >= limit:
                    break
        return claims

    async def apply_notice(self, notice: jobs.Notice, limits: jobs.JobLimits) -> jobs.NoticeOutcome:
        outcome = (await self.apply_notices([notice], limits))[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def _locate_all(self, job_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """The locations of the jobs of ``job_ids`` that exist: remembered ones at once, the
        others read from the job index in one round trip."""
        found: dict[str, tuple[str, str]] = {}
        unknown: list[str] = []
        for job_id in job_ids:
            location = self._index.get(job_id)
            if location is not None:
                found[job_id] = location
            elif job_id not in unknown:
                unknown.append(job_id)
        if not unknown:
            return found
        if len(unknown) == 1:
            location = await self._locate(unknown[0])
            if location is not None:
                found[unknown[0]] = location
            return found
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in unknown:
                pipe.get(self._keys.job_index(job_id))
            with redis_errors_as_unavailable():
                raws = await pipe.execute()
        for job_id, raw in zip(unknown, raws, strict=True):
            location = self._located(job_id, raw)
            if location is not None:
                found[job_id] = location
        return found

    async def apply_notices(
        self, notices: Sequence[jobs.Notice], limits: jobs.JobLimits
    ) -> list[jobs.NoticeOutcome | Exception]:
        """One notice script per notice, all in one pipeline (Redis runs them in order on one
        connection, so the notices of one job apply in their order; each script is atomic and
        a script's error leaves the others applied); the job index is read first, in one round
        trip, only for jobs this process does not remember."""
        outcomes: list[jobs.NoticeOutcome | Exception | None] = [None] * len(notices)
        located = await self._locate_all([notice.job_id for notice in notices])
        planned: list[tuple[int, str, str]] = []  # (index, tenant, session) of each script
        for index, notice in enumerate(notices):
            location = located.get(notice.job_id)
            if location is None:
                outcomes[index] = jobs.NoticeOutcome(jobs.Verdict.UNKNOWN_JOB)
            elif location[0] != notice.tenant_id:
                outcomes[index] = jobs.NoticeOutcome(jobs.Verdict.WRONG_TENANT)
            else:
                planned.append((index, *location))
        lost: NoScriptError | None = None
        for _attempt in (1, 2):
            if not planned:
                break
            positions: list[int] = []  # of each planned notice's script in the pipeline
            build = functools.partial(self._queue_notices, notices, planned, positions, limits)
            with redis_errors_as_unavailable():
                replies = await self._scripts.each_in_one_round_trip(build)
            again: list[tuple[int, str, str]] = []
            for (index, tenant_id, session_id), position in zip(planned, positions, strict=True):
                reply = replies[position]
                if isinstance(reply, NoScriptError):  # did not run: sent again once loaded
                    lost = reply
                    again.append((index, tenant_id, session_id))
                elif isinstance(reply, Exception):
                    outcomes[index] = unavailable_from(reply) or reply
                else:
                    try:
                        outcomes[index] = self._notice_outcome(
                            notices[index].job_id, tenant_id, session_id, reply
                        )
                    except Exception as exc:  # e.g. DataLoss: an event that does not decode
                        outcomes[index] = exc
            planned = again
        for index, _, _ in planned:  # NOSCRIPT twice: Redis restarted in between
            assert lost is not None
            outcomes[index] = scripts_lost(lost)
        return [outcome for outcome in outcomes if outcome is not None]

    def _queue_notices(
        self,
        notices: Sequence[jobs.Notice],
        planned: list[tuple[int, str, str]],
        positions: list[int],
        limits: jobs.JobLimits,
        pipe: ScriptPipeline,
    ) -> None:
        self._queue_hint_drops(pipe.commands)
        for index, tenant_id, session_id in planned:
            positions.append(len(pipe.commands))
            self._queue_notice(pipe, notices[index], tenant_id, session_id, limits)

    def _queue_notice(
        self,
        pipe: ScriptPipeline,
        notice: jobs.Notice,
        tenant_id: str,
        session_id: str,
        limits: jobs.JobLimits,
    ) -> None:
        """The notice script for ``notice`` (and its finalize hint) on ``pipe``: its reply is
        the first the pipeline gets for these commands."""
        usage = notice.usage
        # A completed notice's data goes without its usage: the script appends the job's
        # (its own tokens and its internal calls', jobs/notice.lua).
        data = notice.data
        if notice.event is jobs.NoticeEvent.COMPLETED:
            data = {k: v for k, v in data.items() if k != "usage"}
        pipe.run(
            "notice",
            keys=self._job_keys(tenant_id, session_id, notice.job_id),
            args=[
                notice.job_id,
                notice.service.value,
                notice.sequence,
                notice.event.value,
                _compact(data),
                limits.heartbeat_ms,
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens,
                limits.retention_ms,
                *self._log_args(tenant_id, session_id),
                self._keys.usage_prefix(tenant_id),
                USAGE_RETENTION_MS,
                limits.handoff_grace_ms,
                self._keys.job(tenant_id, ""),
                self._keys.session(tenant_id, ""),
            ],
        )
        # A completed notice may make the job FINISHING: its finalize is then checked by its
        # lease, scored in the same round trip; not for a job started here without history to
        # append, nor for an embedding (its plan never appends history).
        if (
            notice.event is jobs.NoticeEvent.COMPLETED
            and notice.service is not Service.EMBEDDING
            and notice.job_id not in self._no_finalize
        ):
            member = _member(tenant_id, session_id, notice.job_id)
            # Never later (LT): an entry there is the job's own finalize lease already (a
            # repeated completed notice changes nothing).
            pipe.commands.zadd(
                self._keys.job_finalizes(shard_of(notice.job_id)),
                {member: _now_ms() + limits.handoff_grace_ms},
                lt=True,
            )

    def _notice_outcome(
        self, job_id: str, tenant_id: str, session_id: str, reply: list[Any]
    ) -> jobs.NoticeOutcome:
        """The outcome of a notice script's ``reply``."""
        status = as_str(reply[0])
        if status in _HANDED_OVER:
            self._handed_over(job_id)
        if status == "finishing":
            claim = _claim_from_reply(tenant_id, job_id, reply)
            return jobs.NoticeOutcome(
                jobs.Verdict.ACCEPTED, finishing=claim, traceparent=claim.job.traceparent
            )
        verdict = jobs.Verdict(status)
        if verdict is jobs.Verdict.JOB_FINISHED:
            self._forget(job_id)
        if verdict is not jobs.Verdict.ACCEPTED:
            return jobs.NoticeOutcome(verdict)
        event = self._event(session_id, reply)
        if event.kind.is_final:
            self._forget(job_id)
        return jobs.NoticeOutcome(verdict, event, traceparent=as_str(reply[4]))

    async def finish_job(
        self, tenant_id: str, job_id: str, draft: jobs.EventDraft, limits: jobs.JobLimits
    ) -> tuple[jobs.FinishOutcome, jobs.SessionEvent | None]:
        located = await self._locate(job_id)
        if located is None or located[0] != tenant_id:
            return jobs.FinishOutcome.UNKNOWN_JOB, None
        session_id = located[1]

        def build(pipe: ScriptPipeline) -> None:
            pipe.run(
                "finish",
                keys=self._job_keys(tenant_id, session_id, job_id),
                args=[
                    job_id,
                    draft.kind.value,
                    _compact(draft.data),
                    limits.retention_ms,
                    *self._log_args(tenant_id, session_id),
                ],
            )
            # A FINISHING job's finalize needs no check any more (a no-op for other jobs).
            pipe.commands.zrem(
                self._keys.job_finalizes(shard_of(job_id)), _member(tenant_id, session_id, job_id)
            )

        with redis_errors_as_unavailable():
            reply = (await self._scripts.in_one_round_trip(build))[0]
        outcome = jobs.FinishOutcome(as_str(reply[0]))
        if outcome is not jobs.FinishOutcome.UNKNOWN_JOB:
            self._forget(job_id)
        if outcome is not jobs.FinishOutcome.DONE:
            return outcome, None
        return outcome, self._event(session_id, reply)

    async def record_plan(
        self,
        tenant_id: str,
        job_id: str,
        plan: OrchestrationPlan,
        steps: Sequence[ServiceCall],
        *,
        outputs: Mapping[str, Any] | None = None,
    ) -> list[jobs.SessionEvent] | None:
        located = await self._locate(job_id)
        if located is None or located[0] != tenant_id:
            return None
        session_id = located[1]
        with redis_errors_as_unavailable():
            reply = await self._scripts.run(
                "plan",
                keys=self._job_keys(tenant_id, session_id, job_id),
                args=[
                    job_id,
                    _compact(plan.to_json()),
                    _compact(outputs) if outputs is not None else "",
                    *self._log_args(tenant_id, session_id),
                    "1" if plan.appends_history else "0",
                    *(_compact(plan.step_event(call)) for call in steps),
                ],
            )
        if as_str(reply[0]) != "ok":
            return None
        now = int(reply[1])
        return [
            decode_envelope(session_id, int(reply[i]), now, as_str(reply[i + 1]))
            for i in range(2, len(reply), 2)
        ]

    async def get_job(self, tenant_id: str, job_id: str) -> jobs.Job | None:
        with redis_errors_as_unavailable():
            fields = await self._redis.hgetall(self._keys.job(tenant_id, job_id))
        if not fields:
            return None
        try:
            return _job_from_hash(tenant_id, job_id, fields)
        except (KeyError, ValueError, TypeError) as exc:
            log.warning(
                "job %s of tenant %s: stored record cannot be read (%r)", job_id, tenant_id, exc
            )
            raise DataLoss(f"the stored record of task {job_id} cannot be read") from None

    async def list_tenant_jobs(
        self,
        tenant_id: str,
        *,
        before: tuple[int, str] | None,
        created_from_ms: int | None,
        created_to_ms: int | None,
        limit: int,
    ) -> list[tuple[int, str]]:
        key = self._keys.tenant_jobs(tenant_id)
        low: int | str = created_from_ms if created_from_ms is not None else "-inf"
        high: int | str = f"({created_to_ms}" if created_to_ms is not None else "+inf"
        found: list[tuple[int, str]] = []
        with redis_errors_as_unavailable():
            if before is not None:
                # The cursor came from a page of the same range: its ties (jobs of the same
                # millisecond with smaller ids) first, then the older ones.
                created, job_id = before
                same = await self._redis.zrevrangebyscore(key, created, created)
                found = sorted(
                    ((created, as_str(m)) for m in same if as_str(m) < job_id), reverse=True
                )
                high = f"({created}"
            if len(found) < limit:
                older = await self._redis.zrevrangebyscore(
                    key, high, low, start=0, num=limit - len(found), withscores=True
                )
                found += [(int(score), as_str(member)) for member, score in older]  # type: ignore[str-unpack]
        if created_from_ms is not None:
            found = [entry for entry in found if entry[0] >= created_from_ms]
        return found[:limit]

    async def get_jobs(self, tenant_id: str, job_ids: Sequence[str]) -> list[jobs.Job | None]:
        if not job_ids:
            return []
        with redis_errors_as_unavailable():
            pipe = self._redis.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hgetall(self._keys.job(tenant_id, job_id))
            replies = await pipe.execute()
        found: list[jobs.Job | None] = []
        for job_id, fields in zip(job_ids, replies, strict=True):
            if not fields:
                found.append(None)
                continue
            try:
                found.append(_job_from_hash(tenant_id, job_id, fields))
            except (KeyError, ValueError, TypeError) as exc:
                log.warning(
                    "job %s of tenant %s: unreadable record skipped (%r)", job_id, tenant_id, exc
                )
                found.append(None)
        return found

    async def tenants_started_since(self, since_ms: int) -> set[str]:
        keys = self._keys
        days = range(day_number(since_ms), day_number(_now_ms()) + 1)
        with redis_errors_as_unavailable():
            # One SUNION per shard: a shard's days share its slot.
            pipe = self._redis.pipeline(transaction=False)
            for shard in range(INDEX_SHARDS):
                # Not .sunion(): refused in a cluster pipeline (the command is not).
                pipe.execute_command(
                    "SUNION", *(keys.job_tenants_of_day(shard, day) for day in days)
                )
            replies = await pipe.execute()
        return {as_str(member) for members in replies for member in members}

    async def count_unfinished_of(self, tenant_id: str) -> dict[jobs.JobState, int]:
        with redis_errors_as_unavailable():
            now_ms = time_ms(await self._redis.time())
            pipe = self._redis.pipeline(transaction=False)
            self._count_unfinished_in(pipe, tenant_id, now_ms)
            replies = await pipe.execute()
        return {state: int(n) for state, n in zip(jobs.UNFINISHED_STATES, replies, strict=True)}

    async def count_unfinished(self) -> dict[jobs.JobState, int]:
        """The tenants with jobs (every shard's) with TIME, then the ZCOUNTs of each tenant in
        one pipeline: members scored before now are jobs whose hash expired unfinished, not
        counted. Tenants found with nothing unfinished are unlisted, one tenant at a time."""
        keys = self._keys
        counts = dict.fromkeys(jobs.UNFINISHED_STATES, 0)
        with redis_errors_as_unavailable():
            read = self._redis.pipeline(transaction=False)
            for shard in range(INDEX_SHARDS):
                read.hgetall(keys.job_tenants(shard))
            read.execute_command("TIME")  # not .time(): refused in a cluster pipeline
            *shards, now = await read.execute()
            listed = {
                as_str(tenant): as_str(generation)
                for shard in shards
                for tenant, generation in pairs_to_dict(shard).items()
            }
            tenants = list(listed)
            if not tenants:
                return counts
            now_ms = time_ms(now)
            pipe = self._redis.pipeline(transaction=False)
            for tenant_id in tenants:
                self._count_unfinished_in(pipe, tenant_id, now_ms)
            replies = [int(n) for n in await pipe.execute()]
            per_tenant = len(jobs.UNFINISHED_STATES)
            idle = [
                tenant_id
                for i, tenant_id in enumerate(tenants)
                if not any(replies[i * per_tenant : (i + 1) * per_tenant])
            ]
            if idle:
                await self._unlist(idle, listed)
        for i, n in enumerate(replies):
            counts[jobs.UNFINISHED_STATES[i % per_tenant]] += n
        return counts

    def _count_unfinished_in(self, pipe: Any, tenant_id: str, now_ms: int) -> None:
        """A ZCOUNT in ``pipe`` of the tenant's set of each unfinished state, in the order of
        UNFINISHED_STATES: members scored before ``now_ms`` are jobs whose hash expired
        unfinished, not counted."""
        for state in jobs.UNFINISHED_STATES:
            pipe.zcount(self._keys.jobs_in_state(tenant_id, state.value), now_ms, "+inf")

    async def _unlist(self, idle: Sequence[str], listed: Mapping[str, str]) -> None:
        """Drop idle tenants from their shards, one slot per script: the tenant's own script
        re-checks it has nothing unfinished and ends its listing (only the listing read, so a
        start that listed it anew since keeps it), then its shard drops it only under that
        same listing (a start listing it again meanwhile has replaced it)."""
        keys = self._keys

        def unlist(pipe: ScriptPipeline) -> None:
            for tenant_id in idle:
                pipe.run(
                    "unlist_tenant",
                    keys=[
                        keys.tenant_listing(tenant_id),
                        *(
                            keys.jobs_in_state(tenant_id, state.value)
                            for state in jobs.UNFINISHED_STATES
                        ),
                    ],
                    args=[listed[tenant_id]],
                )

        unlisted = await self._scripts.in_one_round_trip(unlist)
        dropped = [tenant_id for tenant_id, done in zip(idle, unlisted, strict=True) if int(done)]
        if not dropped:
            return

        def drop(pipe: ScriptPipeline) -> None:
            for tenant_id in dropped:
                pipe.run(
                    "drop_tenant",
                    keys=[keys.job_tenants(shard_of(tenant_id))],
                    args=[tenant_id, listed[tenant_id]],
                )

        await self._scripts.in_one_round_trip(drop)

    async def reap_expired(self, limits: jobs.JobLimits, *, limit: int) -> list[jobs.SessionEvent]:
        shards = self._keys.hint_keys("job-deadlines")
        events: list[jobs.SessionEvent] = []
        with redis_errors_as_unavailable():
            for deadlines, member in await due_members(self._redis, shards, limit=limit):
                tenant_id, session_id, job_id = member.split(" ", 2)
                reply = await self._scripts.run(
                    "reap",
                    keys=self._job_keys(tenant_id, session_id, job_id),
                    args=[
                        job_id,
                        limits.retention_ms,
                        *self._log_args(tenant_id, session_id),
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


def _cap_args(tenant_id: str, limits: jobs.JobLimits) -> list[int]:
    """The ARGV of the start and activate scripts' limit check (prelude/jobs.lua over_limit)."""
    caps = limits.caps
    return [
        caps.in_flight_for(tenant_id),
        caps.tokens_per_minute_for(tenant_id),
        caps.retry_after_ms,
    ]


def _limit_reached(reply: list[Any]) -> LimitReached:
    """A script's {'limited', limit, cap, retry_after_ms, service}."""
    return LimitReached(
        LimitKind(as_str(reply[1])), Service(as_str(reply[4])), int(reply[2]), int(reply[3])
    )


def _job_from_hash(tenant_id: str, job_id: str, fields: Mapping[Any, Any]) -> jobs.Job:
    """A job hash as HGETALL returns it, as a Job; raises KeyError, ValueError or TypeError
    when it does not parse."""
    f = {as_str(k): as_str(v) for k, v in fields.items()}
    request_id = json.loads(f["request"])
    if not isinstance(request_id, str):
        raise TypeError("request id is not text")
    return jobs.Job(
        job_id=job_id,
        tenant_id=tenant_id,
        session_id=f["session"],
        service=Service(f["service"]),
        kind=WorkKind(f["kind"]),
        state=jobs.JobState(f["state"]),
        request_id=request_id,
        created_at_ms=int(f["created"]),
        updated_at_ms=int(f["updated"]),
        deadline_ms=int(f["deadline"]),
        heartbeat_deadline_ms=int(f["hb"]),
        last_notice_sequence=int(f["nseq"]),
        usage=TokenUsage(int(f["ptok"]), int(f["ctok"]), int(f["ttok"])),
        agent_id=f.get("agent", ""),
        model=f.get("model", ""),
        cache_key=f.get("ckey", ""),
        keep_final=f.get("keep") == "1",
        final_event=_final_event(f["session"], f["final"]) if "final" in f else None,
        plan=OrchestrationPlan.from_json(json.loads(f["plan"])) if f.get("plan") else None,
        agent=AgentConfig.from_json(json.loads(f["ag"])) if f.get("ag") else None,
        finishing_ms=int(f.get("fin", 0)),
        traceparent=f.get("tp", ""),
        parent_job_id=f.get("par", ""),
        internal_call_ids=tuple(f.get("calls", "").split()),
    )


def _claim_from_reply(tenant_id: str, job_id: str, reply: list[Any]) -> jobs.HandoffClaim:
    """A claim as the scripts return it (claim_reply in registry/lua/prelude/jobs.lua)."""
    status = as_str(reply[0])
    spec = json.loads(as_str(reply[3]))
    plan, agent, outputs, result = (as_str(reply[i]) for i in range(13, 17))
    job = jobs.NewJob(
        job_id=job_id,
        session_id=as_str(reply[4]),
        agent_id=as_str(reply[8]),
        service=Service(as_str(reply[5])),
        kind=WorkKind(as_str(reply[6])),
        content=spec["c"],
        request_id=json.loads(as_str(reply[7])),
        model=as_str(reply[9]),
        cache_key=as_str(reply[10]),
        collections=tuple(spec.get("l") or ()),
        priority=QueuePriority(spec.get("p") or QueuePriority.NORMAL),
        keep_final=as_str(reply[12]) == "1",
        plan=OrchestrationPlan.from_json(json.loads(plan)) if plan else None,
        agent=AgentConfig.from_json(json.loads(agent)) if agent else None,
        traceparent=as_str(reply[18]),
    )
    accepted = as_str(reply[11])
    finalize = status in ("finishing", "finalize", "finalize_exhausted")
    return jobs.HandoffClaim(
        tenant_id,
        job,
        int(reply[2]),
        exhausted=status.endswith("exhausted"),
        requeue=bool(accepted),
        accepted_sequence=int(accepted or 0),
        finalize=finalize,
        result=json.loads(result) if finalize and result else None,
        outputs=json.loads(outputs) if outputs else None,
        deadline_ms=int(reply[17]),
    )

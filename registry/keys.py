"""The Redis key layout, in one place.

Every key of a tenant carries the hash tag ``{t:<tenant>}``, so all of a tenant's keys live in
one Redis Cluster slot and multi-key scripts over them stay atomic on a cluster. Tenant ids are
validated (domain.ids) to contain no braces.

The global indexes (the job deadline, hand-off and finalize hints, the batch expiry hints, the
sets of tenants with jobs) are split into ``INDEX_SHARDS`` shards, each under a hash tag of its
own (``{<index>:<n>}``), so on a cluster they spread over the masters and no scan or command
needs two slots; a member's shard follows from its id (``shard_of``), and a scan reads every
shard. Records looked up by an id alone (an API key, a job's location) carry a tag of their own
(or none: the whole key is hashed), one slot each. A work queue keeps every key under its own
tag per shard: ``{q:<queue>}`` for shard 0, ``{q:<queue>/<n>.<j>}`` for shard n
(``queue_shard_tag``), a tenant's items all in one shard (``queue_shard_of``). One Redis holds
the same layout.
"""

from __future__ import annotations

import functools
import itertools
import zlib
from dataclasses import dataclass
from typing import NamedTuple

from redis.crc import key_slot

# How many shards each global index is split into. Fixed: changing it moves members to other
# keys (the scans would miss the old ones).
INDEX_SHARDS = 16


def shard_of(member_id: str) -> int:
    """The shard (0 .. INDEX_SHARDS - 1) of an index member keyed by ``member_id`` (a job,
    tenant or batch id): stable across processes and restarts."""
    return zlib.crc32(member_id.encode()) % INDEX_SHARDS


class SessionKeys(NamedTuple):
    """The keys the session scripts take, in their order (a list of them is their KEYS)."""

    hash: str  # the session's fields (KeySpace.session)
    pending: str  # set of the session's job ids in flight (KeySpace.session_pending)


class BatchKeys(NamedTuple):
    """The five keys of one batch, in the order the batch item scripts take them
    (registry/lua/prelude/batch_items.lua)."""

    hash: str  # the batch's fields and counts
    states: str  # hash of item index -> item state
    custom_ids: str  # hash of item index -> the caller's custom_id
    jobs: str  # hash of item index -> ``<job_id> <session_id>`` of the job running it
    results: str  # stream of the item results; entry ids are ``<sequence>-0``


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Builds key names under a configurable prefix."""

    prefix: str = "ao"

    def tenant_tag(self, tenant_id: str) -> str:
        return f"{self.prefix}:{{t:{tenant_id}}}"

    def rate_limit(self, tenant_id: str, key_id: str = "") -> str:
        """String with a GCRA theoretical arrival time (microseconds, Redis clock): the
        tenant's bucket, or with ``key_id`` the bucket of one of its API keys."""
        suffix = f":key:{key_id}" if key_id else ""
        return f"{self.tenant_tag(tenant_id)}:ratelimit{suffix}"

    def session(self, tenant_id: str, session_id: str) -> str:
        """Hash with the session's fields."""
        return f"{self.tenant_tag(tenant_id)}:session:{session_id}"

    def session_pending(self, tenant_id: str, session_id: str) -> str:
        """Set of the session's job ids in flight."""
        return f"{self.tenant_tag(tenant_id)}:session:{session_id}:pending"

    def session_line(self, tenant_id: str, session_id: str) -> str:
        """List of the session's QUEUED job ids, oldest first: the order they start in."""
        return f"{self.tenant_tag(tenant_id)}:session:{session_id}:line"

    def session_keys(self, tenant_id: str, session_id: str) -> SessionKeys:
        """The keys of the session scripts (registry/lua/prelude/sessions.lua)."""
        return SessionKeys(
            self.session(tenant_id, session_id), self.session_pending(tenant_id, session_id)
        )

    def session_index(self, tenant_id: str) -> str:
        """Sorted set (all scores 0) of the tenant's session ids; ids sort by creation time."""
        return f"{self.tenant_tag(tenant_id)}:sessions"

    def session_events(self, tenant_id: str, session_id: str) -> str:
        """Stream of the session's events; entry ids are ``<sequence>-0``."""
        return f"{self.tenant_tag(tenant_id)}:session:{session_id}:events"

    def session_event_seq(self, tenant_id: str, session_id: str) -> str:
        """Counter of the session's last event sequence (outlives trimming of the stream)."""
        return f"{self.tenant_tag(tenant_id)}:session:{session_id}:seq"

    def job(self, tenant_id: str, job_id: str) -> str:
        """Hash with a job's fields."""
        return f"{self.tenant_tag(tenant_id)}:job:{job_id}"

    def jobs_in_state(self, tenant_id: str, state: str) -> str:
        """Sorted set of the tenant's job ids in one unfinished state (queued, pending, running),
        scored by when the job's hash expires (ms, Redis clock): a member whose score has
        passed is a job that vanished unfinished, not counted and trimmed later."""
        return f"{self.tenant_tag(tenant_id)}:jobs:{state}"

    def tenant_jobs(self, tenant_id: str) -> str:
        """Sorted set of the tenant's job ids by creation time (ms, Redis clock), written by
        the start script and trimmed to the longest a job is retained (admin ListTasks)."""
        return f"{self.tenant_tag(tenant_id)}:jobs:all"

    def _shard(self, index: str, shard: int) -> str:
        """The key of one shard of a global index, under a hash tag of its own."""
        if not 0 <= shard < INDEX_SHARDS:
            raise ValueError(f"shard {shard} out of range")
        return f"{self.prefix}:{{{index}:{shard}}}"

    def job_tenants_of_day(self, shard: int, day: int) -> str:
        """Set of the tenants of one shard (``shard_of(tenant)``) that started a job on a UTC
        day (days since the epoch); kept three days (admin GetStats sums their tokens of
        today). In the slot of the shard's ``job_tenants``."""
        return f"{self._shard('job-tenants', shard)}:{day}"

    def tenant_listing(self, tenant_id: str) -> str:
        """String in the tenant's slot: the listing of the tenant in its ``job_tenants`` shard
        (a generation, the id of the job that listed it), expiring after a while so that a
        listing lost between two round trips is made again (registry.redis_jobs)."""
        return f"{self.tenant_tag(tenant_id)}:listed"

    def limits_prefix(self, tenant_id: str) -> str:
        """Prefix of the tenant's keys of the limits toward the services (domain.service_caps;
        the job scripts build them: prelude/jobs.lua): ``inflight:<service>``, a sorted set of
        its jobs in flight at the service scored by when each job hash expires, and
        ``tpm:<minute>``, the tokens charged to it in that minute (Redis clock)."""
        return f"{self.tenant_tag(tenant_id)}:lim:"

    def usage_prefix(self, tenant_id: str) -> str:
        """Prefix of the tenant's daily usage hashes; the key of a day appends its number
        (days since the epoch, UTC). Fields: total, prompt, completion, jobs, agent:<id>."""
        return f"{self.tenant_tag(tenant_id)}:usage:"

    def usage_day(self, tenant_id: str, day: int) -> str:
        return f"{self.usage_prefix(tenant_id)}{day}"

    def embedding_cache(self, tenant_id: str, key: str) -> str:
        """String with a cached embedding result (JSON), expiring after the cache TTL."""
        return f"{self.tenant_tag(tenant_id)}:embcache:{key}"

    def agent_config(self, tenant_id: str, agent_id: str) -> str:
        """Hash with a cached agent configuration: ``v`` its version, ``c`` the configuration
        (JSON); expires after the cache TTL."""
        return f"{self.tenant_tag(tenant_id)}:agent:{agent_id}"

    def agent_generation(self, tenant_id: str, agent_id: str) -> str:
        """Counter of the agent's cache invalidations: a configuration fetched before the last
        invalidation is not cached (registry/lua/agents/put.lua). A key prefix of its own, so
        no agent id makes it collide with a configuration key."""
        return f"{self.tenant_tag(tenant_id)}:agentgen:{agent_id}"

    def job_index(self, job_id: str) -> str:
        """String ``<tenant> <session>`` for a job id: lets a notice's claimed tenant be checked
        against the job's real one (a wrong tenant is then reported, not "unknown job"). One
        key per job without a hash tag (job ids have no braces): the whole key is hashed, so
        the index spreads over every slot; only ever read or written alone."""
        return f"{self.prefix}:jobidx:{job_id}"

    def job_tenants(self, shard: int) -> str:
        """Hash of the tenants of one shard (``shard_of(tenant)``) that may have unfinished jobs
        -> their listing generation (``tenant_listing``): where counting unfinished jobs looks.
        Outside every tenant's slot, so only a lookup list, pruned per tenant
        (registry.redis_jobs count_unfinished)."""
        return self._shard("job-tenants", shard)

    def job_deadlines(self, shard: int) -> str:
        """Sorted set of ``<tenant> <session> <job>`` by the time the reaper should look at it,
        one per shard (``shard_of(job)``). Only a hint: the job hash holds the real deadlines,
        checked atomically by the reaper."""
        return self._shard("job-deadlines", shard)

    def job_handoffs(self, shard: int) -> str:
        """Sorted set of ``<tenant> <session> <job>`` by when a job's hand-off to its service
        should be checked (the lease of the hand-off in progress), per shard of the job. Only a
        hint, like ``job_deadlines``: the job hash holds the spec and the real lease, checked
        atomically."""
        return self._shard("job-handoffs", shard)

    def job_finalizes(self, shard: int) -> str:
        """Sorted set of ``<tenant> <session> <job>`` by when a FINISHING job's finalize
        (appending its turns, then completing it) should be checked: its finalize lease. A hint
        like ``job_handoffs`` (apart from it, so a late hand-off confirmation never drops it);
        the job hash holds the real lease."""
        return self._shard("job-finalizes", shard)

    def hint_keys(self, index: str) -> list[str]:
        """Every key a scan of the hint index ``index`` (job-deadlines, job-handoffs,
        job-finalizes, batch-expiry) reads: its shards, then the unsharded key of releases
        before the sharding (``<prefix>:<index>``), only drained now."""
        return [self._shard(index, n) for n in range(INDEX_SHARDS)] + [f"{self.prefix}:{index}"]

    def instance_marker(self) -> str:
        """String naming this Redis data set (a random id, set once): when it is missing or
        has changed, the data every replica knew is gone (server.data_loss)."""
        return f"{self.prefix}:instance"

    def session_channel(self, tenant_id: str, session_id: str) -> str:
        """Shard channel of the session's events (SPUBLISH / SSUBSCRIBE, fan-out to every
        server process), under the tenant's hash tag: the slot of the scripts that publish."""
        return f"{self.tenant_tag(tenant_id)}:ev:{session_id}"

    def parse_session_channel(self, channel: str) -> tuple[str, str] | None:
        """(tenant, session) of a session's shard channel, or of its classic channel
        (``legacy_session_channel``); None for any other channel."""
        head = f"{self.prefix}:{{t:"
        if channel.startswith(head):
            tenant_id, sep, session_id = channel[len(head) :].partition("}:ev:")
            return (tenant_id, session_id) if sep and tenant_id and session_id else None
        head = f"{self.prefix}:ev:"
        if not channel.startswith(head):
            return None
        tenant_id, _, session_id = channel[len(head) :].partition(":")
        return (tenant_id, session_id) if session_id else None

    def legacy_session_channel(self, tenant_id: str, session_id: str) -> str:
        """Classic PUBLISH / SUBSCRIBE channel of the session's events, of the releases before
        sharded pub/sub; used only during a rolling upgrade (ORCH_EVENT_PUBSUB_LEGACY)."""
        return f"{self.prefix}:ev:{tenant_id}:{session_id}"

    def event_publish_channel(self, tenant_id: str, session_id: str, *, legacy: bool) -> str:
        """What the scripts publish a session's events on (the ``channel`` argument of
        prelude/jobs.lua's ``append`` and sessions/close.lua): its shard channel, and with
        ``legacy`` its classic channel too, after a newline (ORCH_EVENT_PUBSUB_LEGACY)."""
        channel = self.session_channel(tenant_id, session_id)
        if legacy:
            channel += "\n" + self.legacy_session_channel(tenant_id, session_id)
        return channel

    def event_heartbeat_channel(self, tag: str, process_id: str) -> str:
        """Shard channel of one process's heartbeats to its event reader of one node: the
        hash tag ``tag`` puts it in a slot of that node (registry.shard_nodes)."""
        return f"{self.prefix}:evhb:{{{tag}}}:{process_id}"

    def api_key(self, key_id: str) -> str:
        """Hash with one API key's record (tenant, role, secret hash, times). Looked up by key
        id alone, so it carries its own hash tag rather than the tenant's."""
        return f"{self.prefix}:apikey:{{k:{key_id}}}"

    def api_key_index(self, tenant_id: str) -> str:
        """Sorted set (all scores 0) of the tenant's key ids, for listing."""
        return f"{self.tenant_tag(tenant_id)}:apikeys"

    def revoked_api_keys(self, tenant_id: str) -> str:
        """Set of the tenant's revoked key ids: the revocation as the rate-limit script reads
        it, in the tenant's slot (the key's record, under its own hash tag, says it too)."""
        return f"{self.tenant_tag(tenant_id)}:apikeys:revoked"

    def batch_keys(self, tenant_id: str, batch_id: str) -> BatchKeys:
        """The keys of one batch."""
        base = f"{self.tenant_tag(tenant_id)}:batch:{batch_id}"
        return BatchKeys(base, f"{base}:states", f"{base}:cids", f"{base}:jobs", f"{base}:results")

    def batch_index(self, tenant_id: str) -> str:
        """Sorted set (all scores 0) of the tenant's batch ids; ids sort by creation time."""
        return f"{self.tenant_tag(tenant_id)}:batches"

    def batch_idempotency(self, tenant_id: str, key: str) -> str:
        """String: the batch id submitted with an idempotency key."""
        return f"{self.tenant_tag(tenant_id)}:batch-idem:{key}"

    def batch_expiry(self, shard: int) -> str:
        """Sorted set of ``<tenant> <batch>`` by expiry time, per shard (``shard_of(batch)``);
        a hint for the expiry sweeper (the batch hash holds the real expiry, checked
        atomically)."""
        return self._shard("batch-expiry", shard)

    def work_queue(self, queue: str, shard: int = 0) -> str:
        """Prefix of every key of one shard of a work queue (registry/lua/prelude/queue.lua
        lists them). The hash tag is the queue's shard, not a tenant: the per-level tenant
        rotation and the scripts that serve several tenants in one call need every key of the
        shard in one slot. Shard 0 is ``{q:<queue>}``, the tag of the queue before it was
        sharded (its items run after an upgrade); shard ``n`` > 0 has a tag of its own
        (``queue_shard_tag``) placed so that shards spread evenly over the slots."""
        return f"{self.prefix}:{{{queue_shard_tag(queue, shard)}}}:"

    def work_item(self, queue: str, item_id: str, shard: int = 0) -> str:
        """Hash with a work item's metadata, payload, state and result."""
        return f"{self.work_queue(queue, shard)}i:{item_id}"

    def work_stream(self, queue: str, priority: str, tenant_id: str, shard: int = 0) -> str:
        """Stream of one tenant's ready items at one priority level."""
        return work_stream_key(self.work_queue(queue, shard), priority, tenant_id)


# A work queue has at most this many shards (ORCH_QUEUE_SHARDS).
MAX_QUEUE_SHARDS = 256
# Slot targets of the shards: a shard's tag is placed in a window of CLUSTER_SLOTS >> _TARGET_BITS
# slots (CLUSTER_SLOTS: every slot of a cluster).
CLUSTER_SLOTS = 16384
_TARGET_BITS = 10


def work_stream_key(shard_prefix: str, priority: str, tenant_id: str) -> str:
    """``KeySpace.work_stream`` from the shard's prefix (``KeySpace.work_queue``), which the
    queue keeps: the stream of every completed item is named on the worker's hot path."""
    return f"{shard_prefix}s:{priority}:{tenant_id}"


def queue_shard_of(tenant_id: str, shards: int) -> int:
    """The shard (0 .. shards - 1) holding every item of ``tenant_id``: stable across
    processes and restarts for one shard count."""
    return zlib.crc32(tenant_id.encode()) % shards if shards > 1 else 0


@functools.cache
def queue_shard_tag(queue: str, shard: int) -> str:
    """The hash tag of shard ``shard`` of work queue ``queue`` (without braces).

    Shard 0 keeps the queue's unsharded tag ``q:<queue>``. Shard n > 0 gets ``q:<queue>/n.j``
    with the smallest ``j`` whose slot falls in the window of slot ``bitreverse(n) *
    16384 / 1024``: shards 1, 2, 3, ... land at slots 8192, 4096, 12288, 2048, ... whatever
    the shard count, so any first few shards spread evenly over the masters of a cluster
    (which own contiguous slot ranges), and a shard's tag never depends on how many shards
    there are."""
    if shard == 0:
        return f"q:{queue}"
    if not 0 < shard < 1 << _TARGET_BITS:
        raise ValueError(f"queue shard {shard} out of range")
    width = CLUSTER_SLOTS >> _TARGET_BITS
    target = int(f"{shard:0{_TARGET_BITS}b}"[::-1], 2) * width
    for j in itertools.count():
        tag = f"q:{queue}/{shard}.{j}"
        if target <= key_slot(tag.encode()) < target + width:
            return tag
    raise AssertionError("unreachable")

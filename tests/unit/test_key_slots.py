"""Every key a command or script takes together is in one Redis Cluster slot (registry.keys):
a tenant's keys share its slot, each shard of a global index has a slot of its own."""

from __future__ import annotations

from collections import Counter

from redis.crc import key_slot

from registry.keys import INDEX_SHARDS, KeySpace, shard_of

KEYS = KeySpace("ao")
INDEXES = ("job-deadlines", "job-handoffs", "job-finalizes", "batch-expiry")


def slot(key: str) -> int:
    return int(key_slot(key.encode()))


def test_a_tenants_keys_share_its_slot() -> None:
    tenant = "acme"
    keys = [
        KEYS.rate_limit(tenant),
        KEYS.rate_limit(tenant, "key-1"),
        *KEYS.session_keys(tenant, "s1"),
        KEYS.session_line(tenant, "s1"),
        KEYS.session_index(tenant),
        KEYS.session_events(tenant, "s1"),
        KEYS.session_event_seq(tenant, "s1"),
        KEYS.job(tenant, "j1"),
        KEYS.jobs_in_state(tenant, "running"),
        KEYS.tenant_jobs(tenant),
        KEYS.tenant_listing(tenant),
        KEYS.limits_prefix(tenant) + "inflight:query",
        KEYS.usage_day(tenant, 20_000),
        KEYS.embedding_cache(tenant, "k"),
        KEYS.agent_config(tenant, "a"),
        KEYS.agent_generation(tenant, "a"),
        KEYS.api_key_index(tenant),
        KEYS.revoked_api_keys(tenant),
        *KEYS.batch_keys(tenant, "b1"),
        KEYS.batch_index(tenant),
        KEYS.batch_idempotency(tenant, "idem"),
    ]
    assert {slot(key) for key in keys} == {slot(KEYS.tenant_tag(tenant))}
    assert slot(KEYS.tenant_tag("globex")) != slot(KEYS.tenant_tag("acme"))


def test_each_shard_of_a_global_index_has_a_slot_of_its_own() -> None:
    for index in INDEXES:
        shards = KEYS.hint_keys(index)[:INDEX_SHARDS]
        assert len({slot(key) for key in shards}) == INDEX_SHARDS, index
    tenants = [KEYS.job_tenants(n) for n in range(INDEX_SHARDS)]
    assert len({slot(key) for key in tenants}) == INDEX_SHARDS
    # A shard's days are in the slot of its set of tenants (one SUNION per shard).
    for n in range(INDEX_SHARDS):
        assert slot(KEYS.job_tenants_of_day(n, 20_000)) == slot(KEYS.job_tenants(n))


def test_the_shards_of_the_job_hints_are_the_ones_a_scan_reads() -> None:
    for n in range(INDEX_SHARDS):
        assert KEYS.job_deadlines(n) in KEYS.hint_keys("job-deadlines")
        assert KEYS.job_handoffs(n) in KEYS.hint_keys("job-handoffs")
        assert KEYS.job_finalizes(n) in KEYS.hint_keys("job-finalizes")
        assert KEYS.batch_expiry(n) in KEYS.hint_keys("batch-expiry")
    # ...then the unsharded set of earlier releases, drained.
    assert KEYS.hint_keys("job-deadlines")[-1] == "ao:job-deadlines"


def test_members_spread_over_the_shards() -> None:
    used = {shard_of(f"job-{n}") for n in range(1000)}
    assert used == set(range(INDEX_SHARDS))
    assert shard_of("job-1") == shard_of("job-1")


def test_records_looked_up_by_id_alone_are_spread() -> None:
    api_keys = {slot(KEYS.api_key(f"key{n}")) for n in range(50)}
    job_index = {slot(KEYS.job_index(f"job{n}")) for n in range(50)}
    assert len(api_keys) > 40 and len(job_index) > 40


def test_each_shard_of_a_work_queue_is_in_one_slot() -> None:
    for shard in range(8):
        prefix = KEYS.work_queue("chat", shard)
        keys = [
            prefix + "streams",
            prefix + "dead",
            KEYS.work_item("chat", "i1", shard),
            KEYS.work_stream("chat", "high", "acme", shard),
        ]
        assert {slot(key) for key in keys} == {slot(prefix)}


def test_the_shards_of_a_work_queue_spread_evenly_over_the_slots() -> None:
    # Shards 1..7 sit near 8192, 4096, 12288, 2048, 10240, 6144, 14336, whatever the queue:
    # each third of the slots (three masters of equal ranges) holds two or three of them, and
    # shard 0 (the queue's unsharded slot) lands anywhere.
    for queue in ("chat", "batch"):
        assert len({slot(KEYS.work_queue(queue, shard)) for shard in range(8)}) == 8
        thirds = Counter(slot(KEYS.work_queue(queue, shard)) * 3 // 16384 for shard in range(1, 8))
        assert sorted(thirds.values()) == [2, 2, 3]
    assert KEYS.work_queue("chat", 0) == f"{KEYS.prefix}:{{q:chat}}:"

--! include: prelude/time
-- The work queue's shared part (registry.redis_queue): every state change is one script, so
-- an item's record, its stream entry, the tenant rotation and the delayed set never disagree.
-- Every queue script takes the key prefix of one shard of the queue as ARGV[1] and builds key
-- names from it; every key of a shard shares its hash tag ({q:<queue>} for shard 0, the
-- layout of the unsharded queue; registry.keys.queue_shard_tag for the others), so they live
-- in one slot and the scripts stay atomic on a cluster. A script never touches two shards.
-- Only Redis 7.0 commands are used.
--
-- Keys (after the prefix):
--   i:<item>            hash: t tenant, k kind, p priority, b batch, d payload ('' once done),
--                       q enqueued ms,
--                       st state (queued|running|delayed|done|dead), n deliveries,
--                       e current stream entry id, v result, err last error, f finished ms,
--                       x dead-letter entry id
--   s:<prio>:<tenant>   stream of {i: item id}, consumer group "w"; deleted when empty
--   rr:<prio>           list: rotation of the tenants with undelivered entries at <prio>
--   rs:<prio>           set: the same tenants, to keep the rotation free of duplicates
--   streams             set of every existing stream (scanned by XAUTOCLAIM)
--   delayed             zset item -> due ms (retries waiting for their backoff)
--   dead                stream of {i: item id}: the dead letter, in order of death
--   reclaim_at          ms before which no dequeue scans for expired leases again
--   ch:done             channel: comma-separated ids of items that just finished
--   ch:ready            channel: the highest priority of the items that just became ready
--   tally               hash: delayed:<prio>:<tenant> and dead:<prio>:<tenant> -> count of the
--                       items in the delayed set and the dead letter (for per-tenant stats)
local prefix = ARGV[1]
local group = 'w'
-- now as a string, formatted once: a Lua number passed to redis.call is formatted with
-- printf's '%.17g' on every call (Redis 7.0), far dearer than the command it goes with, so
-- the per-item calls pass strings only.
local now_text = string.format('%d', now)
-- Whether stream entry id a comes before b.
local function entry_before(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, bms = tonumber(ams), tonumber(bms)
  return ams < bms or (ams == bms and tonumber(aseq) < tonumber(bseq))
end
-- Acknowledge and delete a delivered entry. XDEL only when XACK found it pending, so a stale
-- receipt never deletes anything else. An empty stream is dropped with its group: its tenant
-- leaves no keys behind, and enqueue recreates both.
local function ack(stream, entry)
  if redis.call('EXISTS', stream) == 0 then return end
  if redis.call('XACK', stream, group, entry) == 1 then
    redis.call('XDEL', stream, entry)
    if redis.call('XLEN', stream) == 0 then
      redis.call('DEL', stream)
      redis.call('SREM', prefix .. 'streams', stream)
    end
  end
end

-- Whether ``consumer`` holds the pending entry (its lease was not reclaimed by another).
local function owns(stream, entry, consumer)
  if redis.call('EXISTS', stream) == 0 then return false end
  local p = redis.call('XPENDING', stream, group, entry, entry, 1)
  return #p == 1 and p[1][2] == consumer
end

-- Append an entry for the item to its (priority, tenant) stream, creating the stream with its
-- group when missing, and put the tenant in the rotation of its priority; returns the entry id.
-- ``prepared`` (optional): a table of the streams this script call already readied, so a batch
-- checks each stream once; pass it only while nothing in the call can delete a stream.
local function append(id, prio, tenant, prepared)
  local stream = prefix .. 's:' .. prio .. ':' .. tenant
  if not (prepared and prepared[stream]) then
    if redis.call('EXISTS', stream) == 0 then
      redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
      redis.call('SADD', prefix .. 'streams', stream)
    end
    if redis.call('SADD', prefix .. 'rs:' .. prio, tenant) == 1 then
      redis.call('RPUSH', prefix .. 'rr:' .. prio, tenant)
    end
    if prepared then prepared[stream] = true end
  end
  return redis.call('XADD', stream, '*', 'i', id)
end

-- Append a fresh entry for a known item (see append) and mark its record queued.
local function push(rec, id, prio, tenant, prepared)
  redis.call('HSET', rec, 'st', 'queued', 'e', append(id, prio, tenant, prepared))
end

-- Count an item into (delta 1) or out of (-1) the delayed set or the dead letter (``what``)
-- per priority and tenant; a field that reaches zero is dropped.
local function tally(what, prio, tenant, delta)
  local field = what .. ':' .. prio .. ':' .. tenant
  if redis.call('HINCRBY', prefix .. 'tally', field, delta) <= 0 then
    redis.call('HDEL', prefix .. 'tally', field)
  end
end

-- Move the item to the dead letter (kept until redriven: no TTL) and wake its waiters.
local function bury(rec, id, err)
  local pt = redis.call('HMGET', rec, 'p', 't')
  tally('dead', pt[1], pt[2], 1)
  local x = redis.call('XADD', prefix .. 'dead', '*', 'i', id)
  redis.call('HSET', rec, 'st', 'dead', 'err', err, 'f', now_text, 'x', x)
  redis.call('PUBLISH', prefix .. 'ch:done', id)
end

local function final(st)
  return st == 'done' or st == 'dead'
end

"""Lua scripts of the Redis work queue (registry.redis_queue). Every state change is one script,
so an item's record, its stream entry, the tenant rotation and the delayed set never disagree.

All scripts take the queue's key prefix ``P`` as ARGV[1] and build key names from it; every key
of a queue shares the hash tag ``{q:<queue>}``, so they live in one slot and the scripts stay
atomic on a cluster. Time comes from Redis (``TIME``). Only Redis 7.0 commands are used.

Keys (after ``P``)::

    i:<item>            hash: t tenant, k kind, p priority, b batch, d payload, q enqueued ms,
                        st state (queued|running|delayed|done|dead), n deliveries,
                        e current stream entry id, v result, err last error, f finished ms,
                        x dead-letter entry id
    s:<prio>:<tenant>   stream of {i: item id}, consumer group "w"; deleted when empty
    rr:<prio>           list: rotation of tenants that may have undelivered entries at <prio>
    rs:<prio>           set: the same tenants, to keep the rotation free of duplicates
    streams             set of every existing stream (scanned by XAUTOCLAIM)
    delayed             zset item -> due ms (retries waiting for their backoff)
    dead                stream of {i: item id}: the dead letter, in order of death
    reclaim_at          ms before which no dequeue scans for expired leases again
    ch:done             channel: comma-separated ids of items that just finished
    ch:ready            channel: "1" when items became ready
"""

from __future__ import annotations

_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local P = ARGV[1]
local G = 'w'

-- Acknowledge and delete a delivered entry. XDEL only when XACK found it pending, so a stale
-- receipt never deletes anything else. An empty stream is dropped with its group: its tenant
-- leaves no keys behind, and enqueue recreates both.
local function ack(stream, entry)
  if redis.call('EXISTS', stream) == 0 then return end
  if redis.call('XACK', stream, G, entry) == 1 then
    redis.call('XDEL', stream, entry)
    if redis.call('XLEN', stream) == 0 then
      redis.call('DEL', stream)
      redis.call('SREM', P .. 'streams', stream)
    end
  end
end

-- Whether ``consumer`` holds the pending entry (its lease was not reclaimed by another).
local function owns(stream, entry, consumer)
  if redis.call('EXISTS', stream) == 0 then return false end
  local p = redis.call('XPENDING', stream, G, entry, entry, 1)
  return #p == 1 and p[1][2] == consumer
end

-- Append a fresh entry for the item to its (priority, tenant) stream; mark the tenant ready.
local function push(rec, id, prio, tenant)
  local stream = P .. 's:' .. prio .. ':' .. tenant
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XGROUP', 'CREATE', stream, G, '0', 'MKSTREAM')
    redis.call('SADD', P .. 'streams', stream)
  end
  local entry = redis.call('XADD', stream, '*', 'i', id)
  redis.call('HSET', rec, 'st', 'queued', 'e', entry)
  if redis.call('SADD', P .. 'rs:' .. prio, tenant) == 1 then
    redis.call('RPUSH', P .. 'rr:' .. prio, tenant)
  end
end

-- Move the item to the dead letter (kept until redriven: no TTL) and wake its waiters.
local function bury(rec, id, err)
  local x = redis.call('XADD', P .. 'dead', '*', 'i', id)
  redis.call('HSET', rec, 'st', 'dead', 'err', err, 'f', now, 'x', x)
  redis.call('PUBLISH', P .. 'ch:done', id)
end

local function final(st)
  return st == 'done' or st == 'dead'
end
"""

# ARGV: P, then per item: id, tenant, kind, priority, batch ('' for none), payload.
ENQUEUE = (
    _PRELUDE
    + """
local added = 0
for i = 2, #ARGV, 6 do
  local id = ARGV[i]
  local rec = P .. 'i:' .. id
  if redis.call('EXISTS', rec) == 0 then
    redis.call('HSET', rec, 't', ARGV[i + 1], 'k', ARGV[i + 2], 'p', ARGV[i + 3],
      'b', ARGV[i + 4], 'd', ARGV[i + 5], 'n', 0, 'q', now)
    push(rec, id, ARGV[i + 3], ARGV[i + 1])
    added = added + 1
  end
end
if added > 0 then redis.call('PUBLISH', P .. 'ch:ready', '1') end
return added
"""
)

# ARGV: P, consumer, count, lease_ms, max_deliveries.
# Returns {items, wait_hint_ms}. ``items`` is one string: per item the fields id, entry, tenant,
# kind, prio, batch, payload, deliveries, enqueued_ms, each as "<length>:<bytes>" (one bulk
# reply instead of nine elements per item: the client parses replies far slower than Redis
# builds them). Order of work: due retries back to their streams, expired leases
# (XAUTOCLAIM, at most every lease/4 per queue), then new entries by priority and tenant turn.
DEQUEUE = (
    _PRELUDE
    + """
local consumer, count = ARGV[2], tonumber(ARGV[3])
local lease, max = tonumber(ARGV[4]), tonumber(ARGV[5])
local out, packed = {}, {}

local function deliver(stream, entry, id, reclaimed)
  local rec = P .. 'i:' .. id
  local f = redis.call('HMGET', rec, 'st', 'e', 'n')
  if not f[1] or final(f[1]) or f[2] ~= entry then
    ack(stream, entry)  -- stale entry: the item finished, expired or was queued again
    return
  end
  local n = tonumber(f[3])
  if reclaimed and n >= max then
    ack(stream, entry)
    bury(rec, id, redis.call('HGET', rec, 'err') or 'lease expired on every delivery')
    return
  end
  n = n + 1
  redis.call('HSET', rec, 'st', 'running', 'n', n)
  local d = redis.call('HMGET', rec, 't', 'k', 'p', 'b', 'd', 'q')
  out[#out + 1] = id
  for _, v in ipairs({id, entry, d[1], d[2], d[3], d[4], d[5], tostring(n), d[6]}) do
    packed[#packed + 1] = #v .. ':' .. v
  end
end

-- 1. Retries whose backoff is over go back to the tail of their stream.
local delayed = P .. 'delayed'
for _, id in ipairs(redis.call('ZRANGE', delayed, '-inf', now, 'BYSCORE', 'LIMIT', 0, 100)) do
  redis.call('ZREM', delayed, id)
  local rec = P .. 'i:' .. id
  local f = redis.call('HMGET', rec, 'st', 'p', 't')
  if f[1] == 'delayed' then push(rec, id, f[2], f[3]) end
end

-- 2. Entries idle (not renewed) for a whole lease belonged to a dead consumer: claim them.
local gate = P .. 'reclaim_at'
if now >= tonumber(redis.call('GET', gate) or '0') then
  local full = false
  for _, stream in ipairs(redis.call('SMEMBERS', P .. 'streams')) do
    if redis.call('EXISTS', stream) == 0 then
      redis.call('SREM', P .. 'streams', stream)
    else
      local cursor = '0-0'
      repeat
        if #out >= count then full = true; break end
        local r = redis.call('XAUTOCLAIM', stream, G, consumer, lease, cursor,
          'COUNT', count - #out)
        cursor = r[1]
        -- r[3] lists entries deleted while pending; XAUTOCLAIM already dropped them.
        for _, e in ipairs(r[2]) do
          if e and e[2] then deliver(stream, e[1], e[2][2], true) end
        end
      until cursor == '0-0' or redis.call('EXISTS', stream) == 0
    end
    if full then break end
  end
  if not full then
    redis.call('SET', gate, now + math.max(math.floor(lease / 4), 10))
  end
end

-- 3. New entries: levels highest first; within a level one entry per tenant per turn (a lone
-- tenant takes the whole batch at once).
for _, prio in ipairs({'high', 'normal', 'low'}) do
  local rr, rs = P .. 'rr:' .. prio, P .. 'rs:' .. prio
  while #out < count do
    local n = redis.call('LLEN', rr)
    if n == 0 then break end
    local tenant = redis.call('LMOVE', rr, rr, 'LEFT', 'RIGHT')
    local stream = P .. 's:' .. prio .. ':' .. tenant
    local got = false
    if redis.call('EXISTS', stream) == 1 then
      local want = 1
      if n == 1 then want = count - #out end
      local r = redis.call('XREADGROUP', 'GROUP', G, consumer, 'COUNT', want,
        'STREAMS', stream, '>')
      if r then
        for _, e in ipairs(r[1][2]) do
          got = true
          deliver(stream, e[1], e[2][2], false)
        end
      end
    end
    if not got then
      redis.call('LREM', rr, 1, tenant)
      redis.call('SREM', rs, tenant)
    end
  end
end

-- How long a consumer finding nothing may sleep before a retry falls due or leases need a scan.
local hint = math.max(math.floor(lease / 4), 10)
local nxt = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
if #nxt == 2 then hint = math.min(hint, math.max(tonumber(nxt[2]) - now, 1)) end
return {table.concat(packed), hint}
"""
)

# ARGV: P, consumer, then per delivery: stream, entry. Returns 1/0 per delivery: whether the
# consumer still held it (and its idle time, the lease clock, was reset by XCLAIM JUSTID).
RENEW = (
    _PRELUDE
    + """
local consumer = ARGV[2]
local res = {}
for i = 3, #ARGV, 2 do
  local stream, entry = ARGV[i], ARGV[i + 1]
  if owns(stream, entry, consumer) then
    redis.call('XCLAIM', stream, G, consumer, 0, entry, 'JUSTID')
    res[#res + 1] = 1
  else
    res[#res + 1] = 0
  end
end
return res
"""
)

# ARGV: P, result_ttl_ms, then per delivery: id, stream, entry, value. Compare-and-set: the
# first result of an unfinished item is stored; later ones are discarded. Every delivery is
# acknowledged either way. Returns 1 (stored) / 0 (discarded) per delivery.
COMPLETE = (
    _PRELUDE
    + """
local ttl = tonumber(ARGV[2])
local res, done = {}, {}
for i = 3, #ARGV, 4 do
  local id, stream, entry = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  ack(stream, entry)
  local rec = P .. 'i:' .. id
  local st = redis.call('HGET', rec, 'st')
  if st and not final(st) then
    if st == 'delayed' then redis.call('ZREM', P .. 'delayed', id) end
    redis.call('HSET', rec, 'st', 'done', 'v', ARGV[i + 3], 'f', now)
    redis.call('HDEL', rec, 'd', 'err')
    redis.call('PEXPIRE', rec, ttl)
    res[#res + 1] = 1
    done[#done + 1] = id
  else
    res[#res + 1] = 0
  end
end
if #done > 0 then redis.call('PUBLISH', P .. 'ch:done', table.concat(done, ',')) end
return res
"""
)

# ARGV: P, id, stream, entry, consumer, error, retry ('1'/'0'), max_deliveries, base_ms, cap_ms.
FAIL = (
    _PRELUDE
    + """
local id, stream, entry, consumer = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local rec = P .. 'i:' .. id
local st = redis.call('HGET', rec, 'st')
if not st or final(st) then
  ack(stream, entry)
  return 'ignored'
end
if not owns(stream, entry, consumer) then return 'ignored' end
ack(stream, entry)
local n = tonumber(redis.call('HGET', rec, 'n'))
if ARGV[7] == '0' or n >= tonumber(ARGV[8]) then
  bury(rec, id, ARGV[6])
  return 'dead_lettered'
end
local delay = math.min(tonumber(ARGV[10]), tonumber(ARGV[9]) * 2 ^ (n - 1))
redis.call('ZADD', P .. 'delayed', now + math.floor(delay), id)
redis.call('HSET', rec, 'st', 'delayed', 'err', ARGV[6])
return 'retry_scheduled'
"""
)

# ARGV: P, id, stream, entry, consumer. Gives an unfinished delivery back without counting it.
RELEASE = (
    _PRELUDE
    + """
local id, stream, entry, consumer = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if not owns(stream, entry, consumer) then return 0 end
ack(stream, entry)
local rec = P .. 'i:' .. id
local f = redis.call('HMGET', rec, 'st', 'p', 't')
if not f[1] or final(f[1]) then return 0 end
redis.call('HINCRBY', rec, 'n', -1)
push(rec, id, f[2], f[3])
redis.call('PUBLISH', P .. 'ch:ready', '1')
return 1
"""
)

# ARGV: P, id. A dead item goes back to its stream with deliveries reset.
REDRIVE = (
    _PRELUDE
    + """
local id = ARGV[2]
local rec = P .. 'i:' .. id
local f = redis.call('HMGET', rec, 'st', 'p', 't', 'x')
if f[1] ~= 'dead' then return 0 end
redis.call('XDEL', P .. 'dead', f[4])
redis.call('HSET', rec, 'n', 0)
redis.call('HDEL', rec, 'err', 'f', 'x')
push(rec, id, f[2], f[3])
redis.call('PUBLISH', P .. 'ch:ready', '1')
return 1
"""
)

# ARGV: P. Returns {ready, leased, delayed, dead}.
STATS = (
    _PRELUDE
    + """
local ready, leased = 0, 0
for _, stream in ipairs(redis.call('SMEMBERS', P .. 'streams')) do
  if redis.call('EXISTS', stream) == 1 then
    local pending = redis.call('XPENDING', stream, G)[1]
    leased = leased + pending
    ready = ready + redis.call('XLEN', stream) - pending
  end
end
return {ready, leased, redis.call('ZCARD', P .. 'delayed'), redis.call('XLEN', P .. 'dead')}
"""
)

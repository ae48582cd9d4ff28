--! include: prelude/queue
-- Leases up to count items of one shard of the queue to a consumer. Order of work: due retries
-- back to their streams, expired leases (XAUTOCLAIM, at most every lease_ms / 4 per shard),
-- then new entries by priority and tenant turn. An item leased for the max_deliveries-th time
-- and not finished goes to the dead letter.
--
-- A queue of one shard runs the whole of it in one call (mode 'all'). A sharded queue
-- (registry.redis_queue) first runs mode 'peek' on every shard: due retries, expired leases
-- (up to count, which may be 0: no scan then) and the shard's levels; then mode 'take' on the
-- shards it picked: new entries only, of the levels from 'high' down to floor.
--
-- KEYS: none (built from the prefix: one hash tag)
-- ARGV: prefix, consumer, count, lease_ms, max_deliveries, mode ('all' | 'peek' | 'take'),
--   floor (lowest level served: 'high' | 'normal' | 'low')
-- Returns: {values, lengths, wait_hint_ms, high, normal, low}. values is one string: per item
--   the fields id, entry, tenant, kind, prio, batch, payload, deliveries, enqueued_ms, back to
--   back; lengths the length of each field in order, each a 4-byte big-endian integer (two
--   bulk replies instead of nine elements per item: the client parses replies far slower
--   than Redis builds them, and unpacks the lengths in one C call). wait_hint_ms: how long a
--   consumer finding nothing may sleep.
--   high, normal, low: how many tenants of each level have undelivered entries afterwards.
local consumer, count = ARGV[2], tonumber(ARGV[3])
local lease_ms, max_deliveries = tonumber(ARGV[4]), tonumber(ARGV[5])
local mode, floor = ARGV[6], ARGV[7]
local levels = {'high', 'normal', 'low'}

local out, values, lengths, nvalues = {}, {}, {}, 0
local nine_lengths = '>' .. string.rep('I4', 9)

-- One item of the reply: its nine fields (never copied) and their lengths, packed in one call.
local function fields(v1, v2, v3, v4, v5, v6, v7, v8, v9)
  local k = nvalues
  values[k + 1], values[k + 2], values[k + 3], values[k + 4], values[k + 5] = v1, v2, v3, v4, v5
  values[k + 6], values[k + 7], values[k + 8], values[k + 9] = v6, v7, v8, v9
  nvalues = k + 9
  lengths[#lengths + 1] = struct.pack(nine_lengths, #v1, #v2, #v3, #v4, #v5, #v6, #v7, #v8, #v9)
end

-- Delivery counts as text, each formatted once per call (see now_text in the prelude).
local count_texts = {}

-- Leases the stream's entry to the consumer (or acknowledges it when stale). prio and tenant:
-- the stream's, when the caller knows them (the record is not asked for them then).
local function deliver(stream, entry, id, reclaimed, prio, tenant)
  local rec = prefix .. 'i:' .. id
  local f
  if prio then
    f = redis.call('HMGET', rec, 'st', 'e', 'n', 'k', 'b', 'd', 'q')
    f[4], f[5], f[6], f[7], f[8], f[9] = tenant, f[4], prio, f[5], f[6], f[7]
  else
    f = redis.call('HMGET', rec, 'st', 'e', 'n', 't', 'k', 'p', 'b', 'd', 'q')
  end
  if not f[1] or final(f[1]) or f[2] ~= entry then
    ack(stream, entry)  -- stale entry: the item finished, expired or was queued again
    return
  end
  local n = tonumber(f[3])
  if reclaimed and n >= max_deliveries then
    ack(stream, entry)
    bury(rec, id, redis.call('HGET', rec, 'err') or 'lease expired on every delivery')
    return
  end
  n = n + 1
  local n_text = count_texts[n]
  if not n_text then
    n_text = string.format('%d', n)
    count_texts[n] = n_text
  end
  redis.call('HSET', rec, 'st', 'running', 'n', n_text)
  out[#out + 1] = id
  fields(id, entry, f[4], f[5], f[6], f[7], f[8], n_text, f[9])
end

-- 1. Retries whose backoff is over go back to the tail of their stream.
local delayed = prefix .. 'delayed'
local prepared = {}  -- nothing in this step deletes a stream
local housekeeping = mode ~= 'take'
local due = {}
if housekeeping then
  due = redis.call('ZRANGE', delayed, '-inf', now, 'BYSCORE', 'LIMIT', 0, 100)
end
for _, id in ipairs(due) do
  redis.call('ZREM', delayed, id)
  local rec = prefix .. 'i:' .. id
  local f = redis.call('HMGET', rec, 'st', 'p', 't')
  if f[1] == 'delayed' then
    tally('delayed', f[2], f[3], -1)
    push(rec, id, f[2], f[3], prepared)
  end
end

-- 2. Entries idle (not renewed) for a whole lease belonged to a dead consumer: claim them.
local gate = prefix .. 'reclaim_at'
if housekeeping and count > 0 and now >= tonumber(redis.call('GET', gate) or '0') then
  local full = false
  for _, stream in ipairs(redis.call('SMEMBERS', prefix .. 'streams')) do
    if redis.call('EXISTS', stream) == 0 then
      redis.call('SREM', prefix .. 'streams', stream)
    else
      local cursor = '0-0'
      repeat
        if #out >= count then full = true; break end
        local r = redis.call('XAUTOCLAIM', stream, group, consumer, lease_ms, cursor,
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
    redis.call('SET', gate, now + math.max(math.floor(lease_ms / 4), 10))
  end
end

-- 3. New entries: levels highest first, down to floor; within a level one entry per tenant per
-- turn (a lone tenant takes the whole batch at once). A tenant leaves the rotation as soon as
-- its stream has no undelivered entry left (the last entry read is the stream's last), so the
-- length of a rotation is the number of tenants with work at that level.
local function take(prio)
  local rr, rs = prefix .. 'rr:' .. prio, prefix .. 'rs:' .. prio
  while #out < count do
    local n = redis.call('LLEN', rr)
    if n == 0 then break end
    local tenant = redis.call('LMOVE', rr, rr, 'LEFT', 'RIGHT')
    local stream = prefix .. 's:' .. prio .. ':' .. tenant
    local more = false
    if redis.call('EXISTS', stream) == 1 then
      local want = 1
      if n == 1 then want = count - #out end
      local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want,
        'STREAMS', stream, '>')
      if r and #r[1][2] > 0 then
        local entries = r[1][2]
        local last = entries[#entries][1]
        for _, e in ipairs(entries) do deliver(stream, e[1], e[2][2], false, prio, tenant) end
        -- deliver may have deleted stale entries, or the stream with the last of them.
        local top = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
        more = top ~= nil and entry_before(last, top[1])
      end
    end
    if not more then
      redis.call('LREM', rr, 1, tenant)
      redis.call('SREM', rs, tenant)
    end
  end
end

if mode ~= 'peek' then
  for _, prio in ipairs(levels) do
    take(prio)
    if prio == floor then break end
  end
end

-- How long a consumer finding nothing may sleep before a retry falls due or leases need a scan.
local hint = math.max(math.floor(lease_ms / 4), 10)
local nxt = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
if #nxt == 2 then hint = math.min(hint, math.max(tonumber(nxt[2]) - now, 1)) end
return {table.concat(values), table.concat(lengths), hint,
  redis.call('LLEN', prefix .. 'rr:high'), redis.call('LLEN', prefix .. 'rr:normal'),
  redis.call('LLEN', prefix .. 'rr:low')}

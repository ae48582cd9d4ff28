--! include: prelude/queue
-- Stores the results of deliveries, compare-and-set: the first result of an unfinished item
-- is stored; later ones are discarded. Every delivery is acknowledged either way, and the
-- items that finished are announced on ch:done. The entries XACK found pending (as ack
-- does) are deleted at the end, per stream: those older than every entry still pending
-- (with none pending, every entry up to the last one delivered) in one XTRIM MINID (an XDEL
-- walks its entry's stream node from the start, over the entries deleted before it: dearer
-- than anything else per item), the others by XDEL.
--
-- KEYS: none (built from the prefix: one hash tag)
-- ARGV: prefix, result_ttl_ms, then per delivery: id, stream, entry, value
-- Returns: per delivery 1 (stored) or 0 (discarded)
-- Kept as the caller's text: passed on as it is (see now_text).
local result_ttl_ms = ARGV[2]
local first_delivery = 3
-- Entry ids per XDEL: well under Lua's limit on unpacked values.
local xdel_chunk = 500

local res, done, ndone = {}, {}, 0
local acked, streams = {}, {}
for i = first_delivery, #ARGV, 4 do
  local id, stream, entry, value = unpack(ARGV, i, i + 3)
  -- XACK on a missing stream or group answers 0, as it does for an entry no longer pending.
  if redis.call('XACK', stream, group, entry) == 1 then
    local entries = acked[stream]
    if not entries then
      entries = {}
      acked[stream] = entries
      streams[#streams + 1] = stream
    end
    entries[#entries + 1] = entry
  end
  local rec = prefix .. 'i:' .. id
  local st = redis.call('HGET', rec, 'st')
  if st and not final(st) then
    if st == 'delayed' then
      redis.call('ZREM', prefix .. 'delayed', id)
      local pt = redis.call('HMGET', rec, 'p', 't')
      tally('delayed', pt[1], pt[2], -1)
    end
    -- The payload and any earlier error are blanked rather than deleted: one command less.
    redis.call('HSET', rec, 'st', 'done', 'v', value, 'f', now_text, 'd', '', 'err', '')
    redis.call('PEXPIRE', rec, result_ttl_ms)
    res[#res + 1] = 1
    ndone = ndone + 1
    done[ndone] = id
  else
    res[#res + 1] = 0
  end
end
-- The id right after stream entry id ``id``.
local function next_id(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return ms .. '-' .. string.format('%d', tonumber(seq) + 1)
end

-- The id of the last entry the group has delivered from ``stream``.
local function last_delivered(stream)
  for _, info in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local fields = {}
    for i = 1, #info, 2 do fields[info[i]] = info[i + 1] end
    if fields['name'] == group then return fields['last-delivered-id'] end
  end
  return '0-0'
end

-- Every entry of a stream is pending, not yet delivered, or acknowledged and deleted in the
-- same script (here, ack, deliver). The entries older than the oldest one pending were
-- delivered (the undelivered are newer than every delivered entry) and are not pending: they
-- are acknowledged, and trimming them deletes nothing else. With nothing pending, that holds
-- of every entry up to the last one delivered.
for _, stream in ipairs(streams) do
  local entries = acked[stream]
  local oldest = redis.call('XPENDING', stream, group, '-', '+', '1')[1]
  if oldest then
    local pending = oldest[1]
    if redis.call('XTRIM', stream, 'MINID', pending) < #entries then
      -- Acknowledged after an entry that is still pending: deleted one by one.
      local rest = {}
      for _, entry in ipairs(entries) do
        if not entry_before(entry, pending) then rest[#rest + 1] = entry end
      end
      for first = 1, #rest, xdel_chunk do
        redis.call('XDEL', stream, unpack(rest, first, math.min(first + xdel_chunk - 1, #rest)))
      end
    end
  else
    redis.call('XTRIM', stream, 'MINID', next_id(last_delivered(stream)))
    if redis.call('XLEN', stream) == 0 then
      redis.call('DEL', stream)
      redis.call('SREM', prefix .. 'streams', stream)
    end
  end
end
if ndone > 0 then redis.call('PUBLISH', prefix .. 'ch:done', table.concat(done, ',')) end
return res

--! include: prelude/queue
-- Stores the results of deliveries, compare-and-set: the first result of an unfinished item
-- is stored; later ones are discarded. Every delivery is acknowledged either way, and the
-- items that finished are announced on ch:done.
--
-- KEYS: none (built from the prefix: one hash tag)
-- ARGV: prefix, result_ttl_ms, then per delivery: id, stream, entry, value
-- Returns: per delivery 1 (stored) or 0 (discarded)
local result_ttl_ms = tonumber(ARGV[2])
local first_delivery = 3

local res, done = {}, {}
for i = first_delivery, #ARGV, 4 do
  local id, stream, entry, value = unpack(ARGV, i, i + 3)
  ack(stream, entry)
  local rec = prefix .. 'i:' .. id
  local st = redis.call('HGET', rec, 'st')
  if st and not final(st) then
    if st == 'delayed' then
      redis.call('ZREM', prefix .. 'delayed', id)
      local pt = redis.call('HMGET', rec, 'p', 't')
      tally('delayed', pt[1], pt[2], -1)
    end
    redis.call('HSET', rec, 'st', 'done', 'v', value, 'f', now)
    redis.call('HDEL', rec, 'd', 'err')
    redis.call('PEXPIRE', rec, result_ttl_ms)
    res[#res + 1] = 1
    done[#done + 1] = id
  else
    res[#res + 1] = 0
  end
end
if #done > 0 then redis.call('PUBLISH', prefix .. 'ch:done', table.concat(done, ',')) end
return res

--! include: prelude/queue
-- Gives an unfinished delivery back to the queue without counting it: ready at once, or after
-- delay_ms in the delayed set (as a retry waits for its backoff).
--
-- KEYS: none (built from the prefix: one hash tag)
-- ARGV: prefix, id, stream, entry, consumer, delay_ms
-- Returns: 1 when given back, 0 when the consumer no longer held it or the item finished
local id, stream, entry, consumer = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local delay_ms = tonumber(ARGV[6])

if not owns(stream, entry, consumer) then return 0 end
ack(stream, entry)
local rec = prefix .. 'i:' .. id
local f = redis.call('HMGET', rec, 'st', 'p', 't')
if not f[1] or final(f[1]) then return 0 end
redis.call('HINCRBY', rec, 'n', -1)
if delay_ms > 0 then
  redis.call('ZADD', prefix .. 'delayed', now + delay_ms, id)
  redis.call('HSET', rec, 'st', 'delayed')
  return 1
end
push(rec, id, f[2], f[3])
redis.call('PUBLISH', prefix .. 'ch:ready', f[2])
return 1

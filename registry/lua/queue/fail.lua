--! include: prelude/queue
-- A consumer reports a delivery failed: retried after an exponential backoff (base_ms * 2 ^
-- (deliveries - 1), at most cap_ms), or moved to the dead letter when retry is '0' or every
-- delivery is spent. A delivery the consumer no longer holds changes nothing.
--
-- KEYS: none (built from the prefix: one hash tag)
-- ARGV: prefix, id, stream, entry, consumer, error_text, retry ('1' | '0'), max_deliveries,
--   base_ms, cap_ms
-- Returns: 'ignored' | 'dead_lettered' | 'retry_scheduled'
local id, stream, entry, consumer = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local error_text, retry = ARGV[6], ARGV[7]
local max_deliveries, base_ms, cap_ms = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])

local rec = prefix .. 'i:' .. id
local st = redis.call('HGET', rec, 'st')
if not st or final(st) then
  ack(stream, entry)
  return 'ignored'
end
if not owns(stream, entry, consumer) then return 'ignored' end
ack(stream, entry)
local n = tonumber(redis.call('HGET', rec, 'n'))
if retry == '0' or n >= max_deliveries then
  bury(rec, id, error_text)
  return 'dead_lettered'
end
local delay = math.min(cap_ms, base_ms * 2 ^ (n - 1))
redis.call('ZADD', prefix .. 'delayed', now + math.floor(delay), id)
redis.call('HSET', rec, 'st', 'delayed', 'err', error_text)
local pt = redis.call('HMGET', rec, 'p', 't')
tally('delayed', pt[1], pt[2], 1)
return 'retry_scheduled'

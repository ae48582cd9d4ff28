--! include: prelude/queue
-- Gives an unfinished delivery back to the queue without counting it.
--
-- KEYS: none (built from the prefix: one hash tag)
-- ARGV: prefix, id, stream, entry, consumer
-- Returns: 1 when given back, 0 when the consumer no longer held it or the item finished
local id, stream, entry, consumer = ARGV[2], ARGV[3], ARGV[4], ARGV[5]

if not owns(stream, entry, consumer) then return 0 end
ack(stream, entry)
local rec = prefix .. 'i:' .. id
local f = redis.call('HMGET', rec, 'st', 'p', 't')
if not f[1] or final(f[1]) then return 0 end
redis.call('HINCRBY', rec, 'n', -1)
push(rec, id, f[2], f[3])
redis.call('PUBLISH', prefix .. 'ch:ready', '1')
return 1

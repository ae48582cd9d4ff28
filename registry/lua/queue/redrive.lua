--! include: prelude/queue
-- Sends a dead item back to its stream, with its deliveries reset.
--
-- KEYS: none (built from the prefix: one hash tag)
-- ARGV: prefix, id
-- Returns: 1 when redriven, 0 when the item is not dead
local id = ARGV[2]

local rec = prefix .. 'i:' .. id
local f = redis.call('HMGET', rec, 'st', 'p', 't', 'x')
if f[1] ~= 'dead' then return 0 end
redis.call('XDEL', prefix .. 'dead', f[4])
tally('dead', f[2], f[3], -1)
redis.call('HSET', rec, 'n', 0)
redis.call('HDEL', rec, 'err', 'f', 'x')
push(rec, id, f[2], f[3])
redis.call('PUBLISH', prefix .. 'ch:ready', f[2])
return 1

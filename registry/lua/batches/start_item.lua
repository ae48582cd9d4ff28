--! include: prelude/time
-- Starts an item of an open, unexpired batch: QUEUED -> RUNNING (a redelivered item already
-- RUNNING may run again).
--
-- KEYS: batch_key, states_key
-- ARGV: index (the item's), redelivery ('1' | '0')
-- Returns: 1 when the item started (was QUEUED), 2 when it runs again (was RUNNING), else 0
local batch_key, states_key = KEYS[1], KEYS[2]
local index, redelivery = ARGV[1], ARGV[2]

local state = redis.call('HGET', batch_key, 'state')
if state ~= 'queued' and state ~= 'in_progress' then return 0 end
if now >= tonumber(redis.call('HGET', batch_key, 'expire')) then return 0 end
local item = redis.call('HGET', states_key, index)
if item == 'running' and redelivery == '1' then return 2 end
if item ~= 'queued' then return 0 end
redis.call('HSET', states_key, index, 'running')
redis.call('HINCRBY', batch_key, 'queued', -1)
redis.call('HINCRBY', batch_key, 'running', 1)
redis.call('HSET', batch_key, 'state', 'in_progress', 'updated', now)
return 1

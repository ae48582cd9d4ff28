--! include: prelude/batch_items
-- Records an unfinished item's result (its final state), and completes the batch when it was
-- the last one.
--
-- KEYS: the batch keys of prelude/batch_items.lua (batch_key, states_key, custom_ids_key,
--   jobs_key, results_key)
-- ARGV: index (the item's), state (its final state), job_id, data_json, retention_ms
-- Returns: the result's sequence, or 0 when the item had already finished
local index, state, job_id, data_json = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local retention_ms = tonumber(ARGV[5])

local item = redis.call('HGET', states_key, index)
if item ~= 'queued' and item ~= 'running' then return 0 end
local seq = append(index, item, state, job_id, data_json)
redis.call('HSET', batch_key, 'updated', now)
maybe_complete(retention_ms)
return seq

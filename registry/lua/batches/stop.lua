--! include: prelude/batch_items
-- Cancels or expires a batch that is not final: its QUEUED items end now (with its RUNNING
-- ones when it expires); a cancelled batch with items still running is CANCELLING until they
-- end.
--
-- KEYS: the batch keys of prelude/batch_items.lua (batch_key, states_key, custom_ids_key,
--   jobs_key, results_key)
-- ARGV: stop_state ('cancelled' | 'expired'), error_json (the ended items' data),
--   retention_ms
-- Returns: {found (0 | 1), index1, job1, index2, job2, ...} of the items that were running
local stop_state, error_json = ARGV[1], ARGV[2]
local retention_ms = tonumber(ARGV[3])

local state = redis.call('HGET', batch_key, 'state')
if not state then return {0} end
if state == 'completed' or state == 'failed' or state == 'cancelled' or state == 'expired' then
  return {1}
end
local expire = stop_state == 'expired'
local running = {1}
local items = redis.call('HGETALL', states_key)
for i = 1, #items, 2 do
  local idx, item = items[i], items[i + 1]
  if item == 'running' then
    table.insert(running, idx)
    table.insert(running, redis.call('HGET', jobs_key, idx) or '')
  end
  if item == 'queued' or (expire and item == 'running') then
    append(idx, item, stop_state, '', error_json)
  end
end
if expire then
  redis.call('HSET', batch_key, 'state', 'expired', 'finish', now, 'updated', now)
  retain(retention_ms)
elseif tonumber(redis.call('HGET', batch_key, 'running')) > 0 then
  redis.call('HSET', batch_key, 'state', 'cancelling', 'updated', now)
else
  redis.call('HSET', batch_key, 'state', 'cancelled', 'finish', now, 'updated', now)
  retain(retention_ms)
end
return running

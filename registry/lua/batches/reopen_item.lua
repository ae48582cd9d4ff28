--! include: prelude/batch_items
-- Re-opens an item for a redrive of its dead letter, so that the redriven delivery runs it:
-- a FAILED item (its result leaves the stream, the failed count goes back down) or one left
-- RUNNING by deliveries that all died becomes QUEUED; a batch COMPLETED only by its items'
-- ending is IN_PROGRESS again, with its keys' lifetime as before it was final. Only while the
-- batch is queued, in progress or completed and inside its window.
--
-- KEYS: the batch keys of prelude/batch_items.lua (batch_key, states_key, custom_ids_key,
--   jobs_key, results_key)
-- ARGV: index (the item's), retention_ms
-- Returns: {batch state, item state} after the call ('' for a missing batch or item)
local index, retention_ms = ARGV[1], tonumber(ARGV[2])

local state = redis.call('HGET', batch_key, 'state')
if not state then return {'', ''} end
local item = redis.call('HGET', states_key, index)
if not item then return {state, ''} end
if state ~= 'queued' and state ~= 'in_progress' and state ~= 'completed' then
  return {state, item}
end
if now >= tonumber(redis.call('HGET', batch_key, 'expire')) then return {state, item} end
if item ~= 'failed' and item ~= 'running' then return {state, item} end

if item == 'failed' then
  -- Its result is the newest entry with its custom id (an item has one result at a time).
  local cid = redis.call('HGET', custom_ids_key, index) or ''
  local last = '+'
  local found = nil
  while not found do
    local entries = redis.call('XREVRANGE', results_key, last, '-', 'COUNT', 100)
    if #entries == 0 then break end
    for _, entry in ipairs(entries) do
      local fields = entry[2]
      for i = 1, #fields, 2 do
        if fields[i] == 'c' and fields[i + 1] == cid then found = entry[1] end
      end
      if found then break end
    end
    last = '(' .. entries[#entries][1]
  end
  if found then redis.call('XDEL', results_key, found) end
end
redis.call('HSET', states_key, index, 'queued')
redis.call('HINCRBY', batch_key, item, -1)
redis.call('HINCRBY', batch_key, 'queued', 1)
if state == 'completed' then
  state = 'in_progress'
  redis.call('HSET', batch_key, 'state', state, 'finish', 0)
  local lifetime_end = tonumber(redis.call('HGET', batch_key, 'expire')) + retention_ms
  for _, key in ipairs({batch_key, states_key, custom_ids_key}) do
    redis.call('PEXPIREAT', key, lifetime_end)
  end
  redis.call('PERSIST', jobs_key)
  redis.call('PERSIST', results_key)
end
redis.call('HSET', batch_key, 'updated', now)
return {state, 'queued'}

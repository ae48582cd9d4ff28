--! include: prelude/time
-- The five keys of one batch (one tenant hash tag, so one cluster slot) that the item scripts
-- take, in this order, and the helpers that record an item's result.
-- Batch hash fields: tenant, priority, idem, metadata (JSON), session, state, created,
-- updated, expire, finish, total, queued, running, completed, failed, cancelled, expired, seq
-- (last result sequence). Item states are the domain.batch_models.ItemState values.
local batch_key = KEYS[1]       -- the batch hash
local states_key = KEYS[2]      -- item index -> item state
local custom_ids_key = KEYS[3]  -- item index -> custom id
local jobs_key = KEYS[4]        -- item index -> "<job id> <session id>" of its job
local results_key = KEYS[5]     -- stream of results, entry ids "<sequence>-0"

-- Append a result and move the item between counts; returns the result's sequence.
local function append(idx, from, to, job, data)
  redis.call('HSET', states_key, idx, to)
  redis.call('HINCRBY', batch_key, from, -1)
  redis.call('HINCRBY', batch_key, to, 1)
  local seq = redis.call('HINCRBY', batch_key, 'seq', 1)
  if job == '' then
    local attached = redis.call('HGET', jobs_key, idx)
    if attached then job = string.match(attached, '^(%S+)') or '' end
  end
  local cid = redis.call('HGET', custom_ids_key, idx) or ''
  redis.call('XADD', results_key, seq .. '-0', 'c', cid, 's', to, 'j', job, 'd', data, 't', now)
  return seq
end

-- A final batch keeps its keys for ``ms`` more.
local function retain(ms)
  for _, key in ipairs({batch_key, states_key, custom_ids_key, jobs_key, results_key}) do
    redis.call('PEXPIRE', key, ms)
  end
end

-- Once every item is final, the batch is completed (or cancelled, when it was cancelling).
local function maybe_complete(retention)
  local c = redis.call('HMGET', batch_key, 'total', 'completed', 'failed', 'cancelled', 'expired')
  local done = tonumber(c[2]) + tonumber(c[3]) + tonumber(c[4]) + tonumber(c[5])
  if done < tonumber(c[1]) then return end
  local final = 'completed'
  if redis.call('HGET', batch_key, 'state') == 'cancelling' then final = 'cancelled' end
  redis.call('HSET', batch_key, 'state', final, 'finish', now)
  retain(retention)
end

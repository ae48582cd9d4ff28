"""Lua scripts of registry.redis_batches. Every script touches the keys of one batch (one
tenant hash tag, so one cluster slot) and takes the time from Redis.

Batch hash fields: tenant, priority, idem, metadata (JSON), session, state, created, updated,
expire, finish, total, queued, running, completed, failed, cancelled, expired, seq (last
result sequence). Item states are the domain.batch_models.ItemState values.
"""

from __future__ import annotations

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Append a result and move the item between counts. Needs KEYS batch(1), states(2), cids(3),
# results(5), jobs(4) and `now`.
_APPEND = """
local function append(idx, from, to, job, data)
  redis.call('HSET', KEYS[2], idx, to)
  redis.call('HINCRBY', KEYS[1], from, -1)
  redis.call('HINCRBY', KEYS[1], to, 1)
  local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  if job == '' then
    local attached = redis.call('HGET', KEYS[4], idx)
    if attached then job = string.match(attached, '^(%S+)') or '' end
  end
  local cid = redis.call('HGET', KEYS[3], idx) or ''
  redis.call('XADD', KEYS[5], seq .. '-0', 'c', cid, 's', to, 'j', job, 'd', data, 't', now)
  return seq
end
"""

# KEYS: batch, states, cids, jobs, results, index, idem.
# ARGV: batch_id, tenant, priority, idem_key, metadata_json, window_ms, session_id,
# retention_ms, cid1... Everything expires by window + retention at the latest (a final batch
# gets its retention from when it became final). Returns {1, batch_id} when created,
# {0, existing_id} for a known idempotency key.
CREATE = (
    _NOW
    + """
local lifetime = tonumber(ARGV[6]) + tonumber(ARGV[8])
if ARGV[4] ~= '' then
  local existing = redis.call('GET', KEYS[7])
  if existing then return {0, existing} end
  redis.call('SET', KEYS[7], ARGV[1], 'PX', lifetime)
end
local total = #ARGV - 8
redis.call('HSET', KEYS[1], 'tenant', ARGV[2], 'priority', ARGV[3], 'idem', ARGV[4],
  'metadata', ARGV[5], 'session', ARGV[7], 'state', 'queued', 'created', now, 'updated', now,
  'expire', now + tonumber(ARGV[6]), 'finish', 0, 'total', total, 'queued', total,
  'running', 0, 'completed', 0, 'failed', 0, 'cancelled', 0, 'expired', 0, 'seq', 0)
for i = 1, total do
  redis.call('HSET', KEYS[2], i - 1, 'queued')
  redis.call('HSET', KEYS[3], i - 1, ARGV[8 + i])
end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], lifetime) end
redis.call('ZADD', KEYS[6], 0, ARGV[1])
return {1, ARGV[1]}
"""
)

# KEYS: batch, states. ARGV: index, redelivery (1/0). Returns 1 when the item may run.
START_ITEM = (
    _NOW
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'in_progress' then return 0 end
if now >= tonumber(redis.call('HGET', KEYS[1], 'expire')) then return 0 end
local item = redis.call('HGET', KEYS[2], ARGV[1])
if item == 'running' and ARGV[2] == '1' then return 1 end
if item ~= 'queued' then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], 'running')
redis.call('HINCRBY', KEYS[1], 'queued', -1)
redis.call('HINCRBY', KEYS[1], 'running', 1)
redis.call('HSET', KEYS[1], 'state', 'in_progress', 'updated', now)
return 1
"""
)

# KEYS: batch, states, jobs. ARGV: index, "<job_id> <session_id>". Returns 1 to keep running.
ATTACH_JOB = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= 'running' then return 0 end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
if redis.call('HGET', KEYS[1], 'state') == 'cancelling' then return 0 end
return 1
"""

# A final batch keeps its keys (batch, states, custom ids, jobs, results) for ``ms`` more.
_RETAIN = """
local function retain(ms)
  for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], ms) end
end
"""

_MAYBE_COMPLETE = (
    _RETAIN
    + """
local function maybe_complete(retention)
  local c = redis.call('HMGET', KEYS[1], 'total', 'completed', 'failed', 'cancelled', 'expired')
  local done = tonumber(c[2]) + tonumber(c[3]) + tonumber(c[4]) + tonumber(c[5])
  if done < tonumber(c[1]) then return end
  local final = 'completed'
  if redis.call('HGET', KEYS[1], 'state') == 'cancelling' then final = 'cancelled' end
  redis.call('HSET', KEYS[1], 'state', final, 'finish', now)
  retain(retention)
end
"""
)

# KEYS: batch, states, cids, jobs, results. ARGV: index, state, job_id, data_json, retention_ms.
# Returns the result's sequence, or 0 when the item had already finished.
FINISH_ITEM = (
    _NOW
    + _APPEND
    + _MAYBE_COMPLETE
    + """
local item = redis.call('HGET', KEYS[2], ARGV[1])
if item ~= 'queued' and item ~= 'running' then return 0 end
local seq = append(ARGV[1], item, ARGV[2], ARGV[3], ARGV[4])
redis.call('HSET', KEYS[1], 'updated', now)
maybe_complete(tonumber(ARGV[5]))
return seq
"""
)

# KEYS: batch, states, cids, jobs, results. ARGV: 'cancelled' or 'expired', error data JSON,
# retention_ms. Returns {found (0/1), index1, job1, index2, job2, ...} of the items that were
# running.
STOP = (
    _NOW
    + _APPEND
    + _RETAIN
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0} end
if state == 'completed' or state == 'failed' or state == 'cancelled' or state == 'expired' then
  return {1}
end
local expire = ARGV[1] == 'expired'
local running = {1}
local items = redis.call('HGETALL', KEYS[2])
for i = 1, #items, 2 do
  local idx, item = items[i], items[i + 1]
  if item == 'running' then
    table.insert(running, idx)
    table.insert(running, redis.call('HGET', KEYS[4], idx) or '')
  end
  if item == 'queued' or (expire and item == 'running') then
    append(idx, item, ARGV[1], '', ARGV[2])
  end
end
if expire then
  redis.call('HSET', KEYS[1], 'state', 'expired', 'finish', now, 'updated', now)
  retain(tonumber(ARGV[3]))
elseif tonumber(redis.call('HGET', KEYS[1], 'running')) > 0 then
  redis.call('HSET', KEYS[1], 'state', 'cancelling', 'updated', now)
else
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finish', now, 'updated', now)
  retain(tonumber(ARGV[3]))
end
return running
"""
)

--! include: prelude/time
-- Records a new batch with its items QUEUED, unless its idempotency key is known already.
-- Everything expires by window + retention at the latest (a final batch gets its retention
-- from when it became final).
--
-- KEYS: batch_key, states_key, custom_ids_key, jobs_key, results_key, index_key (the
--   tenant's batches), idempotency_key
-- ARGV: batch_id, tenant, priority, idem (the idempotency key, '' for none), metadata_json,
--   window_ms, session_id, retention_ms, then one custom id per item
-- Returns: {1, batch_id} when created, {0, existing batch id} for a known idempotency key
local batch_key, states_key, custom_ids_key = KEYS[1], KEYS[2], KEYS[3]
local index_key, idempotency_key = KEYS[6], KEYS[7]
local batch_id, tenant, priority, idem = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local metadata_json, session_id = ARGV[5], ARGV[7]
local window_ms, retention_ms = tonumber(ARGV[6]), tonumber(ARGV[8])
local first_custom_id = 9

local lifetime = window_ms + retention_ms
if idem ~= '' then
  local existing = redis.call('GET', idempotency_key)
  if existing then return {0, existing} end
  redis.call('SET', idempotency_key, batch_id, 'PX', lifetime)
end
local total = #ARGV - first_custom_id + 1
redis.call('HSET', batch_key, 'tenant', tenant, 'priority', priority, 'idem', idem,
  'metadata', metadata_json, 'session', session_id, 'state', 'queued', 'created', now,
  'updated', now, 'expire', now + window_ms, 'finish', 0, 'total', total, 'queued', total,
  'running', 0, 'completed', 0, 'failed', 0, 'cancelled', 0, 'expired', 0, 'seq', 0)
for i = 1, total do
  redis.call('HSET', states_key, i - 1, 'queued')
  redis.call('HSET', custom_ids_key, i - 1, ARGV[first_custom_id + i - 1])
end
for _, key in ipairs({batch_key, states_key, custom_ids_key}) do
  redis.call('PEXPIRE', key, lifetime)
end
redis.call('ZADD', index_key, 0, batch_id)
return {1, batch_id}

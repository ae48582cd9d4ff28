--! include: prelude/time
-- Checks and charges GCRA buckets together (the tenant's and the key's): charged only if all
-- allow the request, so a refused request costs nothing. A bucket's state is its theoretical
-- arrival time (TAT, microseconds); its key expires once the bucket is full again.
-- With a key_id, the API key's standing is checked first, in the tenant's own slot: it must be
-- in the tenant's key index and not in its revoked set (registry.api_keys_redis writes both),
-- else nothing is charged. So the edge's key check and rate limit are one round trip.
--
-- KEYS: with a key_id: key_index, revoked_keys, then one tat_key per bucket; else the tat_keys
-- ARGV: key_id ('' for none), then per bucket interval_us (its emission interval) and burst
-- Returns: {1, 0, 0} when allowed, {0, retry_after_ms, index of the limiting bucket} when
-- refused, {0, 0, -1} when the key is revoked or unknown
local key_id = ARGV[1]
local key_index, revoked_keys = KEYS[1], KEYS[2] -- with a key_id only (else tat_keys)
local first = 1
if key_id ~= '' then
  if not redis.call('ZSCORE', key_index, key_id)
      or redis.call('SISMEMBER', revoked_keys, key_id) == 1 then
    return {0, 0, -1}
  end
  first = 3
end
local buckets = #KEYS - first + 1

local new_tats = {}
local worst, worst_i = 0, 0
for i = 1, buckets do
  local tat_key = KEYS[first + i - 1]
  local interval_us, burst = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local stored = redis.call('GET', tat_key)
  local tat = now_us
  if stored then tat = math.max(tonumber(stored), now_us) end
  local new_tat = tat + interval_us
  local wait = new_tat - interval_us * burst - now_us
  if wait > worst then worst, worst_i = wait, i end
  new_tats[i] = new_tat
end
if worst_i > 0 then
  return {0, math.max(1, math.ceil(worst / 1000)), worst_i}
end
for i = 1, buckets do
  local ttl_ms = math.ceil((new_tats[i] - now_us) / 1000) + 1
  redis.call('SET', KEYS[first + i - 1], string.format('%.0f', new_tats[i]),
    'PX', string.format('%d', ttl_ms))
end
return {1, 0, 0}

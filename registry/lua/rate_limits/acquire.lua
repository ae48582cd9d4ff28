--! include: prelude/time
-- Checks and charges GCRA buckets together (the tenant's and the key's): charged only if all
-- allow the request, so a refused request costs nothing. A bucket's state is its theoretical
-- arrival time (TAT, microseconds); its key expires once the bucket is full again.
--
-- KEYS: one tat_key per bucket
-- ARGV: per bucket, interval_us (its emission interval) and burst
-- Returns: {1, 0, 0} when allowed, else {0, retry_after_ms, index of the limiting bucket}
local buckets = #KEYS

local new_tats = {}
local worst, worst_i = 0, 0
for i = 1, buckets do
  local tat_key = KEYS[i]
  local interval_us, burst = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
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
  redis.call('SET', KEYS[i], string.format('%.0f', new_tats[i]), 'PX', string.format('%d', ttl_ms))
end
return {1, 0, 0}

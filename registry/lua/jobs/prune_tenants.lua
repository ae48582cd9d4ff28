--! include: prelude/time
-- Drops from the set of tenants with jobs every listed tenant with no unfinished job left
-- (count_unfinished calls it for the tenants it found idle). A start that races with this adds
-- its job before it adds its tenant back, so a tenant is never dropped while counted.
--
-- KEYS: tenants_key (the set of tenants that started jobs), then per tenant of ARGV its sets
--   of queued, pending, running and finishing jobs (four keys each, in UNFINISHED_STATES
--   order)
-- ARGV: the tenant ids
-- Returns: how many tenants were dropped
local tenants_key = KEYS[1]

local dropped = 0
for i, tenant in ipairs(ARGV) do
  local base = 1 + (i - 1) * 4
  local live = 0
  for j = 1, 4 do
    live = live + redis.call('ZCOUNT', KEYS[base + j], now, '+inf')
  end
  if live == 0 then dropped = dropped + redis.call('SREM', tenants_key, tenant) end
end
return dropped

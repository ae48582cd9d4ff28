--! include: prelude/time
-- Ends a tenant's listing in the set of tenants with jobs when it has no unfinished job left
-- and its listing is still the one count_unfinished read (a missing one counts as that: it
-- expired). Only the tenant's slot: its shard drops it afterwards (jobs/drop_tenant.lua),
-- under the same listing, so a start that lists it anew in between keeps it listed.
--
-- KEYS: listing_key (the tenant's listing), then its sets of queued, pending, running and
--   finishing jobs (in UNFINISHED_STATES order)
-- ARGV: listing (as read from the tenant's shard)
-- Returns: 1 when the listing ended, else 0
local listing_key = KEYS[1]
local listing = ARGV[1]

for i = 2, #KEYS do
  if redis.call('ZCOUNT', KEYS[i], now, '+inf') > 0 then return 0 end
end
local current = redis.call('GET', listing_key)
if current and current ~= listing then return 0 end
redis.call('DEL', listing_key)
return 1

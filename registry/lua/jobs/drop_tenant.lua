-- Drops a tenant from its shard of the set of tenants with jobs, if it is still there under
-- the listing its own slot ended (jobs/unlist_tenant.lua): a start that listed it again since
-- wrote another one, and the tenant stays.
--
-- KEYS: tenants_key (the tenant's shard: tenant -> listing)
-- ARGV: tenant, listing
-- Returns: 1 when dropped, else 0
local tenants_key = KEYS[1]
local tenant, listing = ARGV[1], ARGV[2]

if redis.call('HGET', tenants_key, tenant) ~= listing then return 0 end
return redis.call('HDEL', tenants_key, tenant)

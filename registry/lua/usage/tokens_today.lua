--! include: prelude/time
-- The tenant's total tokens of the current UTC day, by the Redis clock (the notice script
-- writes the day's usage hash, see jobs/notice.lua).
--
-- KEYS: route_key (any key in the tenant's slot, only to route the call on a cluster: the key
--   read is built from the day, under the tenant's hash tag)
-- ARGV: usage_prefix
-- Returns: the day's total tokens (0 when none)
local usage_prefix = ARGV[1]

local day = math.floor(now / 86400000)
return tonumber(redis.call('HGET', usage_prefix .. day, 'total') or '0')

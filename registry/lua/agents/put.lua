-- Caches an agent configuration, unless the agent was invalidated after the caller's lookup
-- (the generation moved on: what the caller fetched may be the configuration the
-- invalidation dropped) or a newer version of it is cached already.
--
-- KEYS: config_key (hash: v version, c configuration JSON), generation_key (the agent's
-- invalidation counter)
-- ARGV: generation (as the caller's lookup read it), version, config_json, ttl_ms
-- Returns: 1 stored, 0 dropped (invalidated since the lookup), -1 kept (a newer version)
local config_key = KEYS[1]
local generation_key = KEYS[2]
local generation = tonumber(ARGV[1])
local version = ARGV[2]
local config_json = ARGV[3]
local ttl_ms = ARGV[4]

if tonumber(redis.call('GET', generation_key) or '0') ~= generation then return 0 end
local cached = redis.call('HGET', config_key, 'v')
if cached and tonumber(cached) > tonumber(version) then return -1 end
redis.call('HSET', config_key, 'v', version, 'c', config_json)
redis.call('PEXPIRE', config_key, ttl_ms)
return 1

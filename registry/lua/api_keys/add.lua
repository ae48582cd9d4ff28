--! include: prelude/time
-- Records a new API key (its secret only as a hash); an existing key id is refused.
--
-- KEYS: key_hash (the key's record)
-- ARGV: tenant, role, description, secret_hash, services (comma-separated; '' = legacy)
-- Returns: the record's fields, or false when the key id exists
local key_hash = KEYS[1]
local tenant = ARGV[1]
local role = ARGV[2]
local description = ARGV[3]
local secret_hash = ARGV[4]
local services = ARGV[5]

if redis.call('EXISTS', key_hash) == 1 then return false end
redis.call('HSET', key_hash, 'tenant', tenant, 'role', role, 'desc', description,
  'hash', secret_hash, 'created', now, 'revoked', '', 'services', services)
return redis.call('HGETALL', key_hash)

--! include: prelude/time
-- Revokes an API key (a key revoked already keeps its first revocation time).
--
-- KEYS: key_hash (the key's record)
-- ARGV: none
-- Returns: the record's fields, or false when there is no such key
local key_hash = KEYS[1]

if redis.call('EXISTS', key_hash) == 0 then return false end
if redis.call('HGET', key_hash, 'revoked') == '' then
  redis.call('HSET', key_hash, 'revoked', now)
end
return redis.call('HGETALL', key_hash)

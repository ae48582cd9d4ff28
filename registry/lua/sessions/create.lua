--! include: prelude/sessions
-- Records a new ACTIVE session and adds it to the tenant's index, forgetting up to two of the
-- oldest index entries whose session is gone (same hash tag, so the same slot), which keeps
-- the index bounded without a sweeper. With keep_open, an open session of that id (not past
-- its expiry) is returned as it is instead: the session of a job's internal calls is opened
-- this way, in one atomic step however many calls race for it.
--
-- KEYS: session_key, pending_key (the session's jobs in flight), index_key (the tenant's
--   sessions)
-- ARGV: session_id, agent_id, user_id, metadata_json, ttl_ms, retention_ms, session_prefix
--   (the key of a session is session_prefix .. its id), hidden ('1': not in the index, the
--   sessions of a job's internal calls), keep_open ('1' | '0')
-- Returns: {session hash fields, pending job ids}
local index_key = KEYS[3]
local session_id, agent_id, user_id, metadata_json = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ttl_ms, retention_ms = tonumber(ARGV[5]), tonumber(ARGV[6])
local session_prefix = ARGV[7]
local hidden, keep_open = ARGV[8], ARGV[9]

if keep_open == '1' then
  local f = redis.call('HMGET', session_key, 'state', 'expires')
  if (f[1] == 'active' or f[1] == 'busy') and now < tonumber(f[2]) then
    return session_reply()
  end
end

local expires = now + ttl_ms
redis.call('HSET', session_key, 'agent_id', agent_id, 'user_id', user_id,
  'metadata', metadata_json, 'state', 'active', 'created', now, 'updated', now,
  'expires', expires, 'ttl', ttl_ms, 'msgs', 0, 'ptok', 0, 'ctok', 0, 'ttok', 0)
redis.call('PEXPIREAT', session_key, expires + retention_ms)
if hidden == '1' then return {redis.call('HGETALL', session_key), {}} end
for _, old in ipairs(redis.call('ZRANGE', index_key, 0, 1)) do
  if redis.call('EXISTS', session_prefix .. old) == 0 then
    redis.call('ZREM', index_key, old)
  end
end
redis.call('ZADD', index_key, 0, session_id)
return {redis.call('HGETALL', session_key), {}}

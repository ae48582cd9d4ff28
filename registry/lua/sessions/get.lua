--! include: prelude/sessions
-- Reads a session: an open one past its expiry becomes EXPIRED (kept for the retention); with
-- touch, an open one's TTL slides from now.
--
-- KEYS: session_key, pending_key (the session's jobs in flight)
-- ARGV: touch ('1' | '0'), retention_ms
-- Returns: {session hash fields, pending job ids}, or false when there is no such session
local touch, retention_ms = ARGV[1], tonumber(ARGV[2])

if redis.call('EXISTS', session_key) == 0 then return false end
local f = redis.call('HMGET', session_key, 'state', 'expires', 'ttl')
local state, expires = f[1], tonumber(f[2])
if (state == 'active' or state == 'busy') and still_open(expires, retention_ms)
    and touch == '1' then
  expires = now + tonumber(f[3])
  redis.call('HSET', session_key, 'expires', expires)
  keep_until(expires + retention_ms)
end
return session_reply()

--! include: prelude/time
-- Closes an open session (one past its expiry becomes EXPIRED instead), kept for the
-- retention. Followers of the session's events are told on its channel
-- (registry.event_codec: "0 <now> closed") so their streams end.
--
-- KEYS: session_key, pending_key (the session's jobs in flight)
-- ARGV: retention_ms, channel (the session's event channel)
-- Returns: {session hash fields, pending job ids}, or false when there is no such session
local session_key = KEYS[1]
local pending_key = KEYS[2]
local retention_ms = tonumber(ARGV[1])
local channel = ARGV[2]

if redis.call('EXISTS', session_key) == 0 then return false end
local f = redis.call('HMGET', session_key, 'state', 'expires')
local state, expires = f[1], tonumber(f[2])
if state == 'active' or state == 'busy' then
  if now >= expires then
    redis.call('HSET', session_key, 'state', 'expired', 'updated', expires)
    redis.call('PEXPIREAT', session_key, expires + retention_ms)
    redis.call('PEXPIREAT', pending_key, expires + retention_ms)
  else
    redis.call('HSET', session_key, 'state', 'closed', 'updated', now)
    redis.call('PEXPIREAT', session_key, now + retention_ms)
    redis.call('PEXPIREAT', pending_key, now + retention_ms)
    redis.call('PUBLISH', channel, '0 ' .. now .. ' closed')
  end
end
return {redis.call('HGETALL', session_key), redis.call('SMEMBERS', pending_key)}

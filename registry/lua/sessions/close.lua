--! include: prelude/sessions
--! include: prelude/publish
-- Closes an open session (one past its expiry becomes EXPIRED instead), kept for the
-- retention. Followers of the session's events are told on its channel
-- (registry.event_codec: "0 <now> closed") so their streams end.
--
-- KEYS: session_key, pending_key (the session's jobs in flight)
-- ARGV: retention_ms, channel (the session's event channel)
-- Returns: {session hash fields, pending job ids}, or false when there is no such session
local retention_ms, channel = tonumber(ARGV[1]), ARGV[2]

if redis.call('EXISTS', session_key) == 0 then return false end
local f = redis.call('HMGET', session_key, 'state', 'expires')
local state, expires = f[1], tonumber(f[2])
if (state == 'active' or state == 'busy') and still_open(expires, retention_ms) then
  redis.call('HSET', session_key, 'state', 'closed', 'updated', now)
  keep_until(now + retention_ms)
  publish_event(channel, '0 ' .. now .. ' closed')
end
return session_reply()

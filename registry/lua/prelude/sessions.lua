--! include: prelude/time
-- The two keys of the scripts that read or close a session (in this order), and the helpers
-- they share.
local session_key = KEYS[1]         -- the session hash
local pending_key = KEYS[2]         -- the session's jobs in flight: a set

-- The session and its pending set are kept until ``at_ms`` (ms since the epoch).
local function keep_until(at_ms)
  redis.call('PEXPIREAT', session_key, at_ms)
  redis.call('PEXPIREAT', pending_key, at_ms)
end

-- Whether an open session is still open: one past its expiry becomes EXPIRED (as of its
-- expiry) and is kept ``retention_ms`` longer.
local function still_open(expires, retention_ms)
  if now < expires then return true end
  redis.call('HSET', session_key, 'state', 'expired', 'updated', expires)
  keep_until(expires + retention_ms)
  return false
end

-- What the scripts return: {session hash fields, pending job ids}.
local function session_reply()
  return {redis.call('HGETALL', session_key), redis.call('SMEMBERS', pending_key)}
end

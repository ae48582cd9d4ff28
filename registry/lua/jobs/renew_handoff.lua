--! include: prelude/time
-- Extends the lease of a hand-off in progress: a PENDING job with its work spec, or a QUEUED
-- job not yet confirmed enqueued.
--
-- KEYS: job_key (the job hash, only)
-- ARGV: handoff_grace_ms
-- Returns: the new lease (ms), or 0 when there is none to extend (handed over, enqueued,
--   ended or gone)
local job_key = KEYS[1]
local handoff_grace_ms = tonumber(ARGV[1])

local f = redis.call('HMGET', job_key, 'state', 'ho', 'hoq')
if not f[2] or not (f[1] == 'pending' or (f[1] == 'queued' and f[3])) then return 0 end
local lease = now + handoff_grace_ms
redis.call('HSET', job_key, 'hol', lease)
return lease

--! include: prelude/time
-- Extends the lease of a hand-off in progress: a PENDING job with its hand-off lease, a QUEUED
-- job not yet confirmed enqueued, or a FINISHING job's finalize.
--
-- KEYS: job_key (the job hash, only)
-- ARGV: handoff_grace_ms
-- Returns: the new lease (ms), or 0 when there is none to extend (handed over, enqueued,
--   ended or gone)
local job_key = KEYS[1]
local handoff_grace_ms = tonumber(ARGV[1])

local f = redis.call('HMGET', job_key, 'state', 'hol', 'hoq', 'fl')
local lease = now + handoff_grace_ms
if f[1] == 'finishing' and f[4] then
  redis.call('HSET', job_key, 'fl', lease)
  return lease
end
if not f[2] or not (f[1] == 'pending' or (f[1] == 'queued' and f[3])) then return 0 end
redis.call('HSET', job_key, 'hol', lease)
return lease

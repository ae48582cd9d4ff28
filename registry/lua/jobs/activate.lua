--! include: prelude/jobs
-- Starts a QUEUED job when its turn has come: it is first in its session's line and no job
-- accepted before it is still in flight. It becomes PENDING with fresh deadlines and a new
-- hand-off lease; its enqueue needs no confirmation any more (its work item was delivered).
--
-- KEYS: the job keys of prelude/jobs.lua (job_key, session_key, pending_key, event_seq_key,
--   events_key, tenant_pending_key, tenant_running_key, line_key, tenant_queued_key,
--   tenant_finishing_key, limits_prefix)
-- ARGV: job_id, deadline_ms, heartbeat_ms, retention_ms (the job's, once final),
--   handoff_grace_ms, in_flight_cap, tpm_cap, retry_after_ms (as start.lua's)
-- Returns: {'started', due} (due: its first deadline), {'limited', limit, cap, retry_after_ms,
--   service}
--   (it stays QUEUED) or {reason} (domain.jobs.ActivateOutcome: unknown_job |
--   already_started | final | session_not_open | wait)
local deadline_ms, heartbeat_ms = tonumber(ARGV[2]), tonumber(ARGV[3])
local retention_ms = tonumber(ARGV[4])
local handoff_grace_ms = tonumber(ARGV[5])
local in_flight_cap, tpm_cap = tonumber(ARGV[6]), tonumber(ARGV[7])
local retry_after_ms = tonumber(ARGV[8])

if redis.call('EXISTS', job_key) == 0 then return {'unknown_job'} end
local state = redis.call('HGET', job_key, 'state')
if state == 'pending' or state == 'running' or state == 'finishing' then
  return {'already_started'}
end
if state ~= 'queued' then return {'final'} end
-- Its work item was delivered, so its enqueue needs no confirmation any more.
redis.call('HDEL', job_key, 'hoq')
local s = redis.call('HMGET', session_key, 'state', 'expires')
if (s[1] ~= 'active' and s[1] ~= 'busy') or now >= tonumber(s[2] or '0') then
  return {'session_not_open'}
end
-- Its turn: first in the line, and every job in flight is in the line (none started).
if redis.call('LINDEX', line_key, 0) ~= job_id
    or redis.call('SCARD', pending_key) > redis.call('LLEN', line_key) then
  return {'wait'}
end
local service = redis.call('HGET', job_key, 'service')
local limited = over_limit(service, in_flight_cap, tpm_cap, retry_after_ms)
if limited then return limited end
redis.call('LPOP', line_key)
local deadline = now + deadline_ms
local hb = now + heartbeat_ms
redis.call('HSET', job_key, 'state', 'pending', 'updated', now, 'deadline', deadline, 'hb', hb,
  'hol', now + handoff_grace_ms, 'hoa', 1)
local lifetime = deadline_ms + retention_ms
redis.call('PEXPIRE', job_key, lifetime)
redis.call('ZREM', tenant_queued_key, job_id)
redis.call('ZADD', tenant_pending_key, now + lifetime, job_id)
extend(tenant_pending_key, lifetime)
count_in_flight(service, now + lifetime)
return {'started', math.min(deadline, hb)}

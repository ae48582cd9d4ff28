--! include: prelude/jobs
-- Times out a job past its deadline or heartbeat deadline (the reaper's deadline set is only a
-- hint: the job's own deadlines are checked here), with the session's bookkeeping, and
-- appends its timed_out event. A job whose hash is gone leaves the tenant's counted sets.
--
-- KEYS: the job keys of prelude/jobs.lua (job_key, session_key, pending_key, event_seq_key,
--   events_key, tenant_pending_key, tenant_running_key, line_key, tenant_queued_key,
--   tenant_finishing_key, limits_prefix)
-- ARGV: job_id, retention_ms (the job's, once final), maxlen, log_ttl_ms, channel
-- Returns: {'done', sequence, now, envelope}, {'later', due} (a heartbeat moved the
--   deadline), {'gone'} or {'final'}
local retention_ms = ARGV[2]
local maxlen, log_ttl_ms, channel = ARGV[3], ARGV[4], ARGV[5]

if redis.call('EXISTS', job_key) == 0 then
  uncount()
  return {'gone'}
end
local f = redis.call('HMGET', job_key, 'state', 'request', 'deadline', 'hb')
if is_final(f[1]) then return {'final'} end
local due = math.min(tonumber(f[3]), tonumber(f[4]))
if now < due then return {'later', due} end
end_job('timed_out', retention_ms)
local env = envelope(f[2], 'timed_out', cjson.encode({deadline_ms = due}))
local seq = append(env, maxlen, log_ttl_ms, channel)
keep_final(seq, env)
return {'done', seq, now, env}

--! include: prelude/jobs
-- Claims a job whose hand-off was interrupted: one with its work spec whose lease has passed.
-- A PENDING one is to be handed over again ('claimed'), a QUEUED one not confirmed enqueued
-- to be enqueued again ('requeue'); either way with a new lease and one more hand-off
-- counted. One that has had every hand-off, or is past its deadline, fails here
-- ('exhausted', with its failed event, kept in its hash when it was started with 'keep'), so
-- nothing happens to it between the claim and its end.
--
-- KEYS: the job keys of prelude/jobs.lua (job_key, session_key, pending_key, event_seq_key,
--   events_key, tenant_pending_key, tenant_running_key, line_key, tenant_queued_key)
-- ARGV: job_id, handoff_grace_ms, max_handoffs, retention_ms (the job's, once final), maxlen,
--   log_ttl_ms, channel, failed_template (the failed event's data JSON, with `{service}` and
--   `{attempts}` to fill in)
-- Returns: {'gone'} | {'done'} (nothing to hand over) | {'later', lease} |
--   {'claimed' | 'requeue' | 'exhausted', lease, attempts, spec, session, service, kind,
--   request, agent, model, cache key, accepted sequence (requeue) or '', keep ('1' or '0')}
local job_id = ARGV[1]
local handoff_grace_ms = tonumber(ARGV[2])
local max_handoffs = tonumber(ARGV[3])
local retention_ms = tonumber(ARGV[4])
local maxlen = ARGV[5]
local log_ttl_ms = tonumber(ARGV[6])
local channel = ARGV[7]
local failed_template = ARGV[8]

if redis.call('EXISTS', job_key) == 0 then return {'gone'} end
local f = redis.call('HMGET', job_key, 'state', 'ho', 'hol', 'hoa', 'deadline', 'session',
  'service', 'kind', 'request', 'agent', 'model', 'ckey', 'hoq', 'keep')
local requeue = f[1] == 'queued' and f[13]
if not f[2] or not (f[1] == 'pending' or requeue) then return {'done'} end
local lease = tonumber(f[3] or '0')
if now < lease then return {'later', lease} end
local attempts = tonumber(f[4] or '0')
local reply = {'exhausted', 0, attempts, f[2], f[6], f[7], f[8], f[9], f[10] or '', f[11] or '',
  f[12] or '', requeue and f[13] or '', f[14] or '0'}
if attempts < max_handoffs and now < tonumber(f[5]) then
  lease = now + handoff_grace_ms
  attempts = attempts + 1
  redis.call('HSET', job_key, 'hol', lease, 'hoa', attempts)
  reply[1] = requeue and 'requeue' or 'claimed'
  reply[2], reply[3] = lease, attempts
  return reply
end
redis.call('HSET', job_key, 'state', 'failed', 'updated', now)
redis.call('PEXPIRE', job_key, retention_ms)
release(job_id)
local data = string.gsub((string.gsub(failed_template, '{service}', f[7])), '{attempts}', attempts)
local env = envelope(job_id, f[9], 'failed', data)
keep_final(append(env, maxlen, log_ttl_ms, channel), env)
return reply

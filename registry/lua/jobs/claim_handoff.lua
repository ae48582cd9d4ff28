--! include: prelude/jobs
-- Claims a job whose hand-off was interrupted: one whose hand-off lease has passed. A PENDING
-- one is to be handed over again ('claimed'), a QUEUED one not confirmed enqueued to be
-- enqueued again ('requeue'), a FINISHING one whose finalize lease has passed to be finalized
-- (its turns appended, then completed: 'finalize'); each with a new lease and one more attempt
-- counted. One that has had every attempt, or is past its deadline, fails here ('exhausted':
-- handoff_failed; 'finalize_exhausted': step_failed naming append_history), with its failed
-- event (kept in its hash when it was started with 'keep'), so nothing happens to it between
-- the claim and its end.
--
-- KEYS: the job keys of prelude/jobs.lua (job_key, session_key, pending_key, event_seq_key,
--   events_key, tenant_pending_key, tenant_running_key, line_key, tenant_queued_key,
--   tenant_finishing_key, limits_prefix)
-- ARGV: job_id, handoff_grace_ms, max_handoffs, retention_ms (the job's, once final), maxlen,
--   log_ttl_ms, channel, failed_template (the failed event's data JSON, with `{service}` and
--   `{attempts}` to fill in), finalize_failed_template (the same for a finalize, `{attempts}`)
-- Returns: {'gone'} | {'done'} (nothing to claim) | {'later', lease} | claim_reply(...) with
--   status 'claimed' | 'requeue' | 'finalize' | 'exhausted' | 'finalize_exhausted'
local handoff_grace_ms, max_handoffs = tonumber(ARGV[2]), tonumber(ARGV[3])
local retention_ms = ARGV[4]
local maxlen, log_ttl_ms, channel = ARGV[5], ARGV[6], ARGV[7]
local failed_template, finalize_failed_template = ARGV[8], ARGV[9]

if redis.call('EXISTS', job_key) == 0 then return {'gone'} end
local f = redis.call('HMGET', job_key, 'state', 'hol', 'hoa', 'deadline', 'hoq', 'fl', 'fa',
  'service', 'request')
local finalize = f[1] == 'finishing' and f[6] ~= false
local requeue = f[1] == 'queued' and f[5]
local lease, attempts
if finalize then
  lease, attempts = tonumber(f[6]), tonumber(f[7] or '0')
else
  if not f[2] or not (f[1] == 'pending' or requeue) then return {'done'} end
  lease, attempts = tonumber(f[2]), tonumber(f[3] or '0')
end
if now < lease then return {'later', lease} end
local accepted = requeue and f[5] or ''
if attempts < max_handoffs and now < tonumber(f[4]) then
  lease = now + handoff_grace_ms
  attempts = attempts + 1
  local status = 'claimed'
  if finalize then
    status = 'finalize'
    redis.call('HSET', job_key, 'fl', lease, 'fa', attempts)
  else
    if requeue then status = 'requeue' end
    redis.call('HSET', job_key, 'hol', lease, 'hoa', attempts)
  end
  return claim_reply(status, lease, attempts, finalize, accepted)
end
local reply = claim_reply(finalize and 'finalize_exhausted' or 'exhausted', 0, attempts,
  finalize, accepted)
end_job('failed', retention_ms)
local data
if finalize then
  data = string.gsub(finalize_failed_template, '{attempts}', attempts)
else
  data = string.gsub((string.gsub(failed_template, '{service}', f[8])), '{attempts}', attempts)
end
local env = envelope(f[9], 'failed', data)
keep_final(append(env, maxlen, log_ttl_ms, channel), env)
return reply

--! include: prelude/jobs
-- Records an unfinished job's plan as it now is (field `plan`), what its finished pre-steps
-- produced for the run (field `po`, when given), and a `plan_step` event for each call whose
-- state changed, all in one step.
--
-- KEYS: the job keys of prelude/jobs.lua (job_key, session_key, pending_key, event_seq_key,
--   events_key, tenant_pending_key, tenant_running_key, line_key, tenant_queued_key,
--   tenant_finishing_key, limits_prefix)
-- ARGV: job_id, plan_json, outputs_json ('' to keep what is there), maxlen, log_ttl_ms,
--   channel, appends ('1': the plan appends history, see notice.lua), then one plan_step
--   event's data JSON per changed call
-- Returns: {'ok', now, sequence, envelope, sequence, envelope, ...} or {reason}
--   (unknown_job | final)
local plan_json, outputs_json = ARGV[2], ARGV[3]
local maxlen, log_ttl_ms, channel = ARGV[4], ARGV[5], ARGV[6]
local appends = ARGV[7]

if redis.call('EXISTS', job_key) == 0 then return {'unknown_job'} end
local f = redis.call('HMGET', job_key, 'state', 'request')
if is_final(f[1]) then return {'final'} end
redis.call('HSET', job_key, 'plan', plan_json)
if outputs_json ~= '' then redis.call('HSET', job_key, 'po', outputs_json) end
if appends == '1' then
  redis.call('HSET', job_key, 'pa', '1')
else
  redis.call('HDEL', job_key, 'pa')
end
local reply = {'ok', now}
for i = 8, #ARGV do
  local env = envelope(f[2], 'plan_step', ARGV[i])
  reply[#reply + 1] = append(env, maxlen, log_ttl_ms, channel)
  reply[#reply + 1] = env
end
return reply

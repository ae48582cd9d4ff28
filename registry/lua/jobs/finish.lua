--! include: prelude/jobs
-- Ends an unfinished job from the orchestrator's side (cancelled, failed, or completed from
-- the embedding cache), with the session's bookkeeping, and appends its final event. A
-- FINISHING job completed here (its finalize done) completes with its stored result.
--
-- KEYS: the job keys of prelude/jobs.lua (job_key, session_key, pending_key, event_seq_key,
--   events_key, tenant_pending_key, tenant_running_key, line_key, tenant_queued_key,
--   tenant_finishing_key, limits_prefix)
-- ARGV: job_id, final_state (cancelled | failed | completed), data_json,
--   retention_ms (the job's, once final), maxlen, log_ttl_ms, channel
-- Returns: {'done', sequence, now, envelope} or {reason} (unknown_job | already_final)
local final_state, data_json = ARGV[2], ARGV[3]
local retention_ms = ARGV[4]
local maxlen, log_ttl_ms, channel = ARGV[5], ARGV[6], ARGV[7]

if redis.call('EXISTS', job_key) == 0 then return {'unknown_job'} end
local f = redis.call('HMGET', job_key, 'state', 'request', 'res')
if is_final(f[1]) then return {'already_final'} end
if final_state == 'completed' and f[1] == 'finishing' then data_json = f[3] or '{}' end
end_job(final_state, retention_ms)
-- Completed from the embedding cache: the reply counts as a message, as with a notice.
if final_state == 'completed' and redis.call('EXISTS', session_key) == 1 then
  redis.call('HINCRBY', session_key, 'msgs', 1)
end
local env = envelope(f[2], final_state, data_json)
local seq = append(env, maxlen, log_ttl_ms, channel)
keep_final(seq, env)
return {'done', seq, now, env}

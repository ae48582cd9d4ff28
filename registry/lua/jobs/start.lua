--! include: prelude/jobs
-- Records a new job on an open session: PENDING (or QUEUED at the back of the session's line
-- when it must wait for its turn), counted, in the session's pending set, the session BUSY,
-- and its `accepted` event appended. A job id already recorded is refused and nothing changes.
-- The job's work spec stays in field `ho` until the job ends; `hol` is the
-- hand-off's lease (a job not confirmed by then is handed over again, see claim_handoff.lua)
-- and `hoa` the number of hand-offs started. A QUEUED job's first hand-off is its enqueue on
-- the work queue: until that is confirmed (or the job is activated) `hoq` holds its accepted
-- event's sequence, which the work item carries.
--
-- KEYS: the job keys of prelude/jobs.lua (job_key, session_key, pending_key, event_seq_key,
--   events_key, tenant_pending_key, tenant_running_key, line_key, tenant_queued_key,
--   tenant_finishing_key), then tenant_jobs_key (the tenant's jobs by creation time: entries
--   older than the longest retention are trimmed here)
-- ARGV: job_id, session_id, service, kind, request_json, agent_id, model,
--   accepted_json (the accepted event's data; deadline_ms and queued are added here),
--   deadline_ms, heartbeat_ms, retention_ms (the job's, once final),
--   if_busy (run | reject | hold), maxlen, log_ttl_ms, channel, cache_key, queue_timeout_ms,
--   hold ('1': queue it even on an idle session), handoff_spec (JSON: what the job hash does
--   not hold of the work request, and its work queue priority), handoff_grace_ms,
--   keep ('1': the job hash keeps its final event, see keep_final), plan_json (the job's
--   plan, '' for none), agent_json (the agent snapshot the plan was made from, or ''),
--   appends ('1': the plan appends history, so a completed notice makes the job FINISHING),
--   traceparent (the W3C trace context the job was accepted under, field `tp`, or '')
-- Returns: {'ok', sequence, now, envelope} or {reason} (job_exists | session_missing |
--   session_not_open | session_busy)
local job_id = ARGV[1]
local session_id = ARGV[2]
local service = ARGV[3]
local kind = ARGV[4]
local request_json = ARGV[5]
local agent_id = ARGV[6]
local model = ARGV[7]
local accepted_json = ARGV[8]
local deadline_ms = tonumber(ARGV[9])
local heartbeat_ms = tonumber(ARGV[10])
local retention_ms = tonumber(ARGV[11])
local if_busy = ARGV[12]
local maxlen = ARGV[13]
local log_ttl_ms = tonumber(ARGV[14])
local channel = ARGV[15]
local cache_key = ARGV[16]
local queue_timeout_ms = tonumber(ARGV[17])
local hold = ARGV[18]
local handoff_spec = ARGV[19]
local handoff_grace_ms = tonumber(ARGV[20])
local keep = ARGV[21]
local plan_json = ARGV[22]
local agent_json = ARGV[23]
local appends = ARGV[24]
local traceparent = ARGV[25]
local tenant_jobs_key = KEYS[11]

if redis.call('EXISTS', job_key) == 1 then return {'job_exists'} end
if redis.call('EXISTS', session_key) == 0 then return {'session_missing'} end
local s = redis.call('HMGET', session_key, 'state', 'expires')
if (s[1] ~= 'active' and s[1] ~= 'busy') or now >= tonumber(s[2]) then
  return {'session_not_open'}
end
local busy = redis.call('SCARD', pending_key) > 0
if if_busy == 'reject' and busy then return {'session_busy'} end
local queued = hold == '1' or (if_busy == 'hold' and busy)
local state = 'pending'
local lifetime = deadline_ms
local deadline = now + deadline_ms
local hb = now + heartbeat_ms
if queued then
  state = 'queued'
  lifetime = queue_timeout_ms + deadline_ms
  deadline = now + queue_timeout_ms
  hb = deadline
end
redis.call('HSET', job_key, 'session', session_id, 'service', service, 'kind', kind,
  'state', state, 'request', request_json, 'agent', agent_id, 'model', model,
  'created', now, 'updated', now, 'deadline', deadline, 'hb', hb, 'nseq', 0,
  'ptok', 0, 'ctok', 0, 'ttok', 0, 'ckey', cache_key,
  'ho', handoff_spec, 'hol', now + handoff_grace_ms, 'hoa', 1)
if keep == '1' then redis.call('HSET', job_key, 'keep', '1') end
if plan_json ~= '' then redis.call('HSET', job_key, 'plan', plan_json) end
if agent_json ~= '' then redis.call('HSET', job_key, 'ag', agent_json) end
if appends == '1' then redis.call('HSET', job_key, 'pa', '1') end
if traceparent ~= '' then redis.call('HSET', job_key, 'tp', traceparent) end
lifetime = lifetime + retention_ms
redis.call('PEXPIRE', job_key, lifetime)
-- Counted as queued or pending until the job ends or its hash expires; jobs that vanished
-- unfinished (their hash expired first) are trimmed here.
redis.call('ZREMRANGEBYSCORE', tenant_pending_key, '-inf', '(' .. now)
redis.call('ZREMRANGEBYSCORE', tenant_running_key, '-inf', '(' .. now)
redis.call('ZREMRANGEBYSCORE', tenant_queued_key, '-inf', '(' .. now)
local counted = tenant_pending_key
if queued then counted = tenant_queued_key end
redis.call('ZADD', counted, now + lifetime, job_id)
extend(counted, lifetime)
redis.call('SADD', pending_key, job_id)
local ttl = redis.call('PTTL', session_key)
if ttl > 0 then redis.call('PEXPIRE', pending_key, ttl) end
if queued then
  redis.call('RPUSH', line_key, job_id)
  if ttl > 0 then redis.call('PEXPIRE', line_key, ttl) end
end
local kept_ms = queue_timeout_ms + deadline_ms + retention_ms
redis.call('ZREMRANGEBYSCORE', tenant_jobs_key, '-inf', '(' .. (now - kept_ms))
redis.call('ZADD', tenant_jobs_key, now, job_id)
extend(tenant_jobs_key, kept_ms)
redis.call('HINCRBY', session_key, 'msgs', 1)
redis.call('HSET', session_key, 'state', 'busy', 'updated', now)
local members = {'"deadline_ms":' .. math.min(deadline, hb)}
if queued then members[#members + 1] = '"queued":true' end
local env = envelope(job_id, request_json, 'accepted', with_members(accepted_json, members))
local seq = append(env, maxlen, log_ttl_ms, channel)
if queued then redis.call('HSET', job_key, 'hoq', seq) end
return {'ok', seq, now, env}

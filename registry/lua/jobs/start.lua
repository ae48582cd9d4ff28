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
--   tenant_finishing_key, limits_prefix), then tenant_jobs_key (the tenant's jobs by creation
--   time: entries older than the longest retention are trimmed here)
-- ARGV: job_id, session_id, service, kind, request_json, agent_id, model,
--   accepted_json (the accepted event's data; deadline_ms and queued are added here),
--   deadline_ms, heartbeat_ms, retention_ms (the job's, once final),
--   if_busy (run | reject | hold), maxlen, log_ttl_ms, channel, cache_key, queue_timeout_ms,
--   hold ('1': queue it even on an idle session), handoff_spec (JSON: what the job hash does
--   not hold of the work request, and its work queue priority), handoff_grace_ms,
--   keep ('1': the job hash keeps its final event, see keep_final), plan_json (the job's
--   plan, '' for none), agent_json (the agent snapshot the plan was made from, or ''),
--   appends ('1': the plan appends history, so a completed notice makes the job FINISHING),
--   traceparent (the W3C trace context the job was accepted under, field `tp`, or ''),
--   parent_job_id (an internal call's parent job, '' for none), max_calls (the internal calls a
--   job may make), job_prefix (the key of a job of the tenant is job_prefix .. its id),
--   in_flight_cap, tpm_cap (tokens per minute), retry_after_ms (the tenant's limits toward the
--   services, 0: none; checked for a job that would be PENDING, see over_limit),
--   session_retention_ms ('': the session is only checked; else the session is read first as
--   sessions/get.lua reads it with touch, in the same step: an open one past its expiry
--   becomes EXPIRED, kept this long, and is refused; an open one's expiry slides from now;
--   and the job's agent is the session's, agent_id is not used)
-- An internal call's job starts only while its parent (same tenant, so the same slot) is
-- pending or running and has made fewer than max_calls calls; the parent counts it (`ic`) and
-- lists it (`calls`: the children's ids, space-separated, oldest first), and
-- the child keeps its parent (`par`) and the parent's session (`pses`) for notice.lua.
-- Returns: {'ok', sequence, now, envelope, agent_id}, {'limited', limit, cap, retry_after_ms,
--   service}, {'session_not_open', state} or {reason} (job_exists | parent_not_in_flight |
--   call_limit | session_missing | session_busy)
local session_id = ARGV[2]
local service, kind, request_json = ARGV[3], ARGV[4], ARGV[5]
local agent_id, model = ARGV[6], ARGV[7]
local accepted_json = ARGV[8]
local deadline_ms, heartbeat_ms = tonumber(ARGV[9]), tonumber(ARGV[10])
local retention_ms = tonumber(ARGV[11])
local if_busy = ARGV[12]
local maxlen, log_ttl_ms, channel = ARGV[13], tonumber(ARGV[14]), ARGV[15]
local cache_key = ARGV[16]
local queue_timeout_ms, hold = tonumber(ARGV[17]), ARGV[18]
local handoff_spec, handoff_grace_ms = ARGV[19], tonumber(ARGV[20])
local keep = ARGV[21]
local plan_json, agent_json, appends = ARGV[22], ARGV[23], ARGV[24]
local traceparent = ARGV[25]
local parent_job_id, max_calls, job_prefix = ARGV[26], tonumber(ARGV[27]), ARGV[28]
local in_flight_cap, tpm_cap = tonumber(ARGV[29]), tonumber(ARGV[30])
local retry_after_ms = tonumber(ARGV[31])
local session_retention_ms = tonumber(ARGV[32])
local tenant_jobs_key = KEYS[12]

if redis.call('EXISTS', job_key) == 1 then return {'job_exists'} end
local parent_key = nil
if parent_job_id ~= '' then
  parent_key = job_prefix .. parent_job_id
  local p = redis.call('HMGET', parent_key, 'state', 'ic')
  if p[1] ~= 'pending' and p[1] ~= 'running' then return {'parent_not_in_flight'} end
  if tonumber(p[2] or '0') >= max_calls then return {'call_limit'} end
end
local s = redis.call('HMGET', session_key, 'state', 'expires', 'ttl', 'agent_id')
-- Every session hash has its state: none, and the session is gone, unless it is there without.
if not s[1] and redis.call('EXISTS', session_key) == 0 then return {'session_missing'} end
local keep_to -- when the session (and so its pending set) expires, once read with touch
if session_retention_ms and (s[1] == 'active' or s[1] == 'busy') then
  -- The session read of sessions/get.lua (touch), the session and its pending set kept until
  -- ``keep_to`` (prelude/sessions.lua's keep_until).
  local expires = tonumber(s[2])
  if now >= expires then
    redis.call('HSET', session_key, 'state', 'expired', 'updated', expires)
    s[1] = 'expired'
    keep_to = int(expires + session_retention_ms)
  else
    s[2] = now + tonumber(s[3])
    redis.call('HSET', session_key, 'expires', int(s[2]))
    keep_to = int(s[2] + session_retention_ms)
  end
  redis.call('PEXPIREAT', session_key, keep_to)
  redis.call('PEXPIREAT', pending_key, keep_to)
end
if (s[1] ~= 'active' and s[1] ~= 'busy') or now >= tonumber(s[2]) then
  return {'session_not_open', s[1]}
end
if session_retention_ms then agent_id = s[4] end
local busy = redis.call('SCARD', pending_key) > 0
if if_busy == 'reject' and busy then return {'session_busy'} end
local queued = hold == '1' or (if_busy == 'hold' and busy)
if not queued then
  local limited = over_limit(service, in_flight_cap, tpm_cap, retry_after_ms)
  if limited then return limited end
end
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
local deadline_text, hb_text = int(deadline), int(hb)
local fields = {'session', session_id, 'service', service, 'kind', kind,
  'state', state, 'request', request_json, 'agent', agent_id, 'model', model,
  'created', now_text, 'updated', now_text, 'deadline', deadline_text, 'hb', hb_text,
  'nseq', '0', 'ptok', '0', 'ctok', '0', 'ttok', '0', 'ckey', cache_key,
  'ho', handoff_spec, 'hol', int(now + handoff_grace_ms), 'hoa', '1'}
-- The optional fields in the same write, after the others (as separate writes would add them).
local function field(name, value)
  fields[#fields + 1] = name
  fields[#fields + 1] = value
end
if keep == '1' then field('keep', '1') end
if plan_json ~= '' then field('plan', plan_json) end
if agent_json ~= '' then field('ag', agent_json) end
if appends == '1' then field('pa', '1') end
if traceparent ~= '' then field('tp', traceparent) end
redis.call('HSET', job_key, unpack(fields))
if parent_key then
  redis.call('HINCRBY', parent_key, 'ic', '1')
  local calls = redis.call('HGET', parent_key, 'calls')
  if calls then calls = calls .. ' ' .. job_id else calls = job_id end
  redis.call('HSET', parent_key, 'calls', calls)
  redis.call('HSET', job_key, 'par', parent_job_id,
    'pses', redis.call('HGET', parent_key, 'session'))
end
lifetime = lifetime + retention_ms
redis.call('PEXPIRE', job_key, int(lifetime))
-- Counted as queued or pending until the job ends or its hash expires; jobs that vanished
-- unfinished (their hash expired first) are trimmed here.
local before_now = '(' .. now_text
redis.call('ZREMRANGEBYSCORE', tenant_pending_key, '-inf', before_now)
redis.call('ZREMRANGEBYSCORE', tenant_running_key, '-inf', before_now)
redis.call('ZREMRANGEBYSCORE', tenant_queued_key, '-inf', before_now)
local counted = tenant_pending_key
if queued then counted = tenant_queued_key end
redis.call('ZADD', counted, int(now + lifetime), job_id)
extend(counted, lifetime)
if not queued then count_in_flight(service, now + lifetime) end
redis.call('SADD', pending_key, job_id)
-- The pending set (and the line) expire with the session. Read with touch, the session's
-- expiry is keep_to, just set: the same as its PTTL from now, without reading it.
local ttl = not keep_to and redis.call('PTTL', session_key)
local function with_session(key)
  if keep_to then
    redis.call('PEXPIREAT', key, keep_to)
  elseif ttl > 0 then
    redis.call('PEXPIRE', key, ttl)
  end
end
with_session(pending_key)
if queued then
  redis.call('RPUSH', line_key, job_id)
  with_session(line_key)
end
local kept_ms = queue_timeout_ms + deadline_ms + retention_ms
redis.call('ZREMRANGEBYSCORE', tenant_jobs_key, '-inf', '(' .. int(now - kept_ms))
redis.call('ZADD', tenant_jobs_key, now_text, job_id)
extend(tenant_jobs_key, kept_ms)
redis.call('HINCRBY', session_key, 'msgs', '1')
redis.call('HSET', session_key, 'state', 'busy', 'updated', now_text)
local members = {'"deadline_ms":' .. int(math.min(deadline, hb))}
if queued then members[#members + 1] = '"queued":true' end
local env = envelope(request_json, 'accepted', with_members(accepted_json, members))
local seq = append(env, maxlen, log_ttl_ms, channel)
if queued then redis.call('HSET', job_key, 'hoq', seq) end
return {'ok', seq, now, env, agent_id}

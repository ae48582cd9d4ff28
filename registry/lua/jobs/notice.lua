--! include: prelude/jobs
-- Applies a service's notice about its job: progress, delta, tool_call or workflow_step make it
-- RUNNING (and renew its heartbeat), completed or failed end it, with the session's
-- bookkeeping, and the event is appended. A duplicate or late notice changes nothing. A
-- completed notice on a job whose plan appends history (field `pa`) makes it FINISHING
-- instead: result (`res`) and usage stored, tokens counted (the session's message is counted
-- when it completes), a finalize lease (`fl`, attempts `fa`), when (`fin`, kept once the job
-- ends: GetTask's plan shows the work done then), no event; the reply is the
-- finalize's claim (claim_reply). A completed notice also adds its
-- tokens to the tenant's usage hash of the current UTC day (`<usage_prefix><days since the
-- epoch>`, by the Redis clock): fields total, prompt, completion, jobs and `agent:<agent id>`.
-- That key is built here because the day comes from the Redis clock; the prefix carries the
-- tenant's hash tag, so it lives in the same cluster slot as the job keys. The tokens count for
-- the tenant's tokens-per-minute limit too (charge_minute).
--
-- KEYS: the job keys of prelude/jobs.lua (job_key, session_key, pending_key, event_seq_key,
--   events_key, tenant_pending_key, tenant_running_key, line_key, tenant_queued_key,
--   tenant_finishing_key, limits_prefix)
-- ARGV: job_id, service, notice_sequence (0: the sender does not number its notices),
--   event (progress | delta | tool_call | workflow_step | completed | failed: also the kind of
--   the event appended), data_json, heartbeat_ms, prompt_tokens,
--   completion_tokens, total_tokens, retention_ms (the job's, once final), maxlen,
--   log_ttl_ms, channel, usage_prefix, usage_retention_ms, handoff_grace_ms (the finalize
--   lease), job_prefix, session_prefix (the key of a job or session of the tenant is the prefix
--   .. its id)
-- A completed notice's data_json comes without its `usage` member: the script appends the
-- job's usage, its own tokens plus those its internal calls rolled up into it (`ptok`, `ctok`,
-- `ttok` are counted up, not set). The tenant and the session are charged the notice's own
-- tokens. The completed notice of an internal call (`par`: its parent job, `pses` the parent's
-- session) adds its tokens to the parent job and the parent's session while the parent is
-- pending or running.
-- Returns: {'accepted', sequence, now, envelope, traceparent (the job's `tp`, or '')},
--   claim_reply('finishing', ...) or {verdict}
--   (unknown_job | wrong_service | duplicate | job_finished)
local service, notice_sequence = ARGV[2], ARGV[3]
local event, data_json = ARGV[4], ARGV[5]
local heartbeat_ms = tonumber(ARGV[6])
local prompt_tokens, completion_tokens, total_tokens = ARGV[7], ARGV[8], ARGV[9]
local retention_ms = ARGV[10]
local maxlen, log_ttl_ms, channel = ARGV[11], ARGV[12], ARGV[13]
local usage_prefix, usage_retention_ms = ARGV[14], ARGV[15]
-- The job's fields a completed or failed notice needs (read once, see `f` below).
local pa, agent, keep, par, pses
local handoff_grace_ms = tonumber(ARGV[16])
local job_prefix, session_prefix = ARGV[17], ARGV[18]

-- A completed notice's tokens go to the tenant's usage of the day.
local function charge()
  local usage_key = usage_prefix .. int(math.floor(now / 86400000))
  agent = agent or ''
  redis.call('HINCRBY', usage_key, 'total', total_tokens)
  redis.call('HINCRBY', usage_key, 'prompt', prompt_tokens)
  redis.call('HINCRBY', usage_key, 'completion', completion_tokens)
  redis.call('HINCRBY', usage_key, 'jobs', '1')
  redis.call('HINCRBY', usage_key, 'agent:' .. agent, total_tokens)
  redis.call('PEXPIRE', usage_key, usage_retention_ms)
  charge_minute(total_tokens)
end

local function session_tokens()
  redis.call('HINCRBY', session_key, 'ptok', prompt_tokens)
  redis.call('HINCRBY', session_key, 'ctok', completion_tokens)
  redis.call('HINCRBY', session_key, 'ttok', total_tokens)
end

-- The job's usage (its internal calls' tokens and the notice's), and a completed notice's data
-- with it as its `usage` member.
local function add_usage()
  local p = redis.call('HINCRBY', job_key, 'ptok', prompt_tokens)
  local c = redis.call('HINCRBY', job_key, 'ctok', completion_tokens)
  local t = redis.call('HINCRBY', job_key, 'ttok', total_tokens)
  if event ~= 'completed' then return end
  data_json = with_members(data_json, {string.format(
    '"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}', p, c, t)})
end

-- An internal call's completion: its tokens go to its parent job and the parent's session.
local function roll_up()
  if not par then return end
  local parent_key = job_prefix .. par
  local state = redis.call('HGET', parent_key, 'state')
  if state ~= 'pending' and state ~= 'running' then return end
  redis.call('HINCRBY', parent_key, 'ptok', prompt_tokens)
  redis.call('HINCRBY', parent_key, 'ctok', completion_tokens)
  redis.call('HINCRBY', parent_key, 'ttok', total_tokens)
  local parent_session = session_prefix .. pses
  if redis.call('EXISTS', parent_session) == 1 then
    redis.call('HINCRBY', parent_session, 'ptok', prompt_tokens)
    redis.call('HINCRBY', parent_session, 'ctok', completion_tokens)
    redis.call('HINCRBY', parent_session, 'ttok', total_tokens)
  end
end

local f = redis.call('HMGET', job_key, 'service', 'state', 'nseq', 'request', 'tp')
-- Every job hash has its service: none, and the job is gone, unless the hash is there without.
if not f[1] and redis.call('EXISTS', job_key) == 0 then return {'unknown_job'} end
if f[1] ~= service then return {'wrong_service'} end
-- A queued job has not been handed to any service yet.
if f[2] == 'queued' then return {'unknown_job'} end
-- Sequence 0: the sender does not number its notices; apply in arrival order.
local n = tonumber(notice_sequence)
local numbered = n ~= 0
if not numbered then n = tonumber(f[3]) + 1 elseif n <= tonumber(f[3]) then return {'duplicate'} end
if is_final(f[2]) or f[2] == 'finishing' then return {'job_finished'} end
-- The stored sequence as text (the caller's when it numbers its notices): the digits '%.17g'
-- gives below 1e15; a larger one stays a number, formatted by redis.call as before.
local n_text = n
if n < 1e15 then
  if numbered then n_text = notice_sequence else n_text = int(n) end
end
local running = event == 'progress' or event == 'delta' or event == 'tool_call'
  or event == 'workflow_step'
if not running then
  local g = redis.call('HMGET', job_key, 'pa', 'agent', 'keep', 'par', 'pses')
  pa, agent, keep, par, pses = g[1], g[2], g[3], g[4], g[5]
end
if event == 'completed' and pa == '1' then
  local lease = now + handoff_grace_ms
  add_usage()
  redis.call('HSET', job_key, 'state', 'finishing', 'nseq', n_text, 'updated', now_text,
    'fin', now_text, 'hb', redis.call('HGET', job_key, 'deadline'), 'res', data_json,
    'fl', int(lease), 'fa', '1')
  handed_over()
  local ttl = redis.call('PTTL', job_key)
  redis.call('ZREM', tenant_pending_key, job_id)
  redis.call('ZREM', tenant_running_key, job_id)
  -- Done at its service: no longer in flight there (service_caps), though not yet final.
  redis.call('ZREM', inflight_key(service), job_id)
  redis.call('ZADD', tenant_finishing_key, int(now + ttl), job_id)
  extend(tenant_finishing_key, ttl)
  if redis.call('EXISTS', session_key) == 1 then session_tokens() end
  charge()
  roll_up()
  return claim_reply('finishing', lease, 1, true, '')
end
if running then
  redis.call('HSET', job_key, 'state', 'running', 'nseq', n_text, 'updated', now_text,
    'hb', int(now + heartbeat_ms))
  if f[2] == 'pending' then
    handed_over()
    local ttl = redis.call('PTTL', job_key)
    redis.call('ZREM', tenant_pending_key, job_id)
    redis.call('ZADD', tenant_running_key, int(now + ttl), job_id)
    extend(tenant_running_key, ttl)
  end
else
  add_usage()
  end_job(event, retention_ms, service, 'nseq', n_text)
  if event == 'completed' and redis.call('EXISTS', session_key) == 1 then
    redis.call('HINCRBY', session_key, 'msgs', '1')
    session_tokens()
  end
  if event == 'completed' then
    charge()
    roll_up()
  end
end
local env = envelope(f[4], event, data_json)
local seq = append(env, maxlen, log_ttl_ms, channel)
if not running then keep_final(seq, env, keep or false) end
return {'accepted', seq, now, env, f[5] or ''}

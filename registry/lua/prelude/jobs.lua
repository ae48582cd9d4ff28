--! include: prelude/time
--! include: prelude/publish
-- The eleven keys every job script but renew_handoff takes (in this order), all under the
-- tenant's hash tag (one cluster slot), the job's id (their first argument), and the helpers
-- that change the job, its session's bookkeeping and the session's event log in one step.
local job_id = ARGV[1]              -- the job's id
local job_key = KEYS[1]             -- the job hash
local session_key = KEYS[2]         -- the session hash
local pending_key = KEYS[3]         -- the session's jobs in flight (queued or not): a set
local event_seq_key = KEYS[4]       -- the session's event sequence counter
local events_key = KEYS[5]          -- the session's event stream
-- The tenant's pending, running and queued jobs: sorted sets scored by when the job hash
-- expires (a job that vanished unfinished is not counted), for the tasks-by-state metric.
local tenant_pending_key = KEYS[6]
local tenant_running_key = KEYS[7]
local line_key = KEYS[8]            -- the session's line: its QUEUED jobs, oldest first
local tenant_queued_key = KEYS[9]
local tenant_finishing_key = KEYS[10]  -- the tenant's FINISHING jobs (as the three above)
-- The prefix of the tenant's limit keys (domain.service_caps; the tenant's hash tag): per
-- service, `inflight:<service>`, a sorted set of its jobs in flight there (PENDING or RUNNING)
-- scored by when the job hash expires; per minute of the Redis clock,
-- `tpm:<minute>`, the tokens charged to the tenant in it.
local limits_prefix = KEYS[11]

-- now as a string, formatted once: a Lua number passed to redis.call is formatted with
-- printf's '%.17g' on every call (Redis 7.0), and one concatenated with '%.14g', both far
-- dearer than an integer's '%d'. So the scripts pass strings: ARGV texts as they came, and
-- numbers they compute through int() (the same digits: every such number is an integer).
local now_text = string.format('%d', now)
local function int(n) return string.format('%d', n) end

local function inflight_key(service) return limits_prefix .. 'inflight:' .. service end
local function minute_tokens_key()
  return limits_prefix .. 'tpm:' .. int(math.floor(now / 60000))
end

-- An event envelope of the job, from complete JSON pieces: its id is validated by the caller, the
-- request id is stored JSON-encoded, the data is JSON made by the caller. Concatenated, not
-- cjson-encoded, so the members keep this order and the bytes clients read stay the same.
local function envelope(request_json, kind, data_json)
  return '{"j":"' .. job_id .. '","r":' .. request_json .. ',"k":"' .. kind .. '","d":'
    .. data_json .. '}'
end

-- The JSON object ``object_json`` (complete, made by the caller) with more members
-- (``'"name":<JSON value>'`` pieces) after its own.
local function with_members(object_json, members)
  if #members == 0 then return object_json end
  local head = string.sub(object_json, 1, -2)
  if head ~= '{' then head = head .. ',' end
  return head .. table.concat(members, ',') .. '}'
end

-- Append an event: next sequence, stream entry <seq>-0 (capped at maxlen), publish. ``ttl``
-- is the caller's ARGV text (log_ttl_ms).
local function append(env, maxlen, ttl, channel)
  local seq = redis.call('INCR', event_seq_key)
  local seq_text = int(seq)
  redis.call('PEXPIRE', event_seq_key, ttl)
  redis.call('XADD', events_key, 'MAXLEN', maxlen, seq_text .. '-0', 't', now_text, 'e', env)
  redis.call('PEXPIRE', events_key, ttl)
  publish_event(channel, seq_text .. ' ' .. now_text .. ' ' .. env)
  return seq
end

-- Keep a key that exists at least ``ttl`` ms longer (a key without a TTL gets one). GT sets
-- the expiry only when later than the key's, which is all the work when the key has one (the
-- usual case: each job keeps the sets a little longer); GT treats a key without one as never
-- expiring, so a refusal is checked with PTTL: -1, no TTL, gets one (as with PTTL < ttl).
local function extend(key, ttl)
  local ttl_text = int(ttl)
  if redis.call('PEXPIRE', key, ttl_text, 'GT') == 0 and redis.call('PTTL', key) == -1 then
    redis.call('PEXPIRE', key, ttl_text)
  end
end

-- Whether a job for ``service`` may start now (domain.service_caps.check): nil, or the reply
-- {'limited', limit, cap, retry_after_ms, service}. Caps of 0 are no limit. Jobs whose hash expired
-- unfinished are trimmed from the count first.
local function over_limit(service, in_flight_cap, tpm_cap, retry_after_ms)
  local key = inflight_key(service)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now_text)
  if in_flight_cap > 0 and redis.call('ZCARD', key) >= in_flight_cap then
    return {'limited', 'in_flight', in_flight_cap, retry_after_ms, service}
  end
  if tpm_cap > 0 and tonumber(redis.call('GET', minute_tokens_key()) or '0') >= tpm_cap then
    return {'limited', 'tokens_per_minute', tpm_cap, 60000 - now % 60000, service}
  end
  return nil
end

-- The job is in flight at ``service`` until it ends or its hash expires (at ``expires``).
local function count_in_flight(service, expires)
  local key = inflight_key(service)
  redis.call('ZADD', key, int(expires), job_id)
  extend(key, expires - now)
end

-- Tokens charged to the tenant now count for this minute's limit.
local function charge_minute(tokens)
  local key = minute_tokens_key()
  redis.call('INCRBY', key, tokens)
  redis.call('PEXPIRE', key, '120000')
end

-- The job is final or gone: it leaves the tenant's sets of unfinished jobs (and, when its
-- hash is still there to name its service, the in-flight count: a gone job's entry is
-- trimmed by its score). ``service``: the job's, when the caller read it already.
local function uncount(service)
  service = service or redis.call('HGET', job_key, 'service')
  if service then redis.call('ZREM', inflight_key(service), job_id) end
  redis.call('ZREM', tenant_pending_key, job_id)
  redis.call('ZREM', tenant_running_key, job_id)
  redis.call('ZREM', tenant_queued_key, job_id)
  redis.call('ZREM', tenant_finishing_key, job_id)
end

-- The job reached its service or ended: its hand-off lease goes (its work spec `ho` stays
-- until it ends: a plan's finalize needs the user's text).
local function handed_over()
  redis.call('HDEL', job_key, 'hol', 'hoa', 'hoq')
end

-- The job ends now in the final ``state`` (with the hash fields ``...``, name and value pairs,
-- in the same write) and is kept ``retention_ms`` more: its work spec, plan outputs, stored
-- result and finalize lease go, it is no longer counted and leaves the session's pending set
-- (and its line, if it was queued); an idle busy session becomes active again.
-- ``retention_ms`` as the caller's ARGV text; ``service``: the job's if read already, or nil.
local function end_job(state, retention_ms, service, ...)
  redis.call('HSET', job_key, 'state', state, 'updated', now_text, ...)
  redis.call('PEXPIRE', job_key, retention_ms)
  -- handed_over()'s fields and the rest, in one call.
  redis.call('HDEL', job_key, 'hol', 'hoa', 'hoq', 'ho', 'po', 'res', 'fl', 'fa', 'pa')
  uncount(service)
  redis.call('SREM', pending_key, job_id)
  redis.call('LREM', line_key, '1', job_id)
  if redis.call('HGET', session_key, 'state') == 'busy'
      and redis.call('SCARD', pending_key) == 0 then
    redis.call('HSET', session_key, 'state', 'active', 'updated', now_text)
  end
end

local function is_final(state)
  return state ~= 'pending' and state ~= 'running' and state ~= 'queued' and state ~= 'finishing'
end

-- What a claim of the job (redis_jobs parses it) carries: {status, lease, attempts, spec,
-- session, service, kind, request, agent, model, cache key, accepted sequence or '', keep,
-- plan, agent snapshot (a hand-off's) or '', plan outputs (a hand-off's) or '', result (a
-- finalize's) or '', deadline, traceparent (the job's trace context) or ''}. A finalize needs
-- neither the snapshot nor the outputs.
-- Read before the job ends (end_job drops the spec, outputs and result).
local function claim_reply(status, lease, attempts, finalize, accepted)
  local f = redis.call('HMGET', job_key, 'ho', 'session', 'service', 'kind', 'request', 'agent',
    'model', 'ckey', 'keep', 'plan', 'deadline', 'tp')
  local snapshot, outputs, result = '', '', ''
  if finalize then
    result = redis.call('HGET', job_key, 'res') or ''
  else
    local h = redis.call('HMGET', job_key, 'ag', 'po')
    snapshot, outputs = h[1] or '', h[2] or ''
  end
  return {status, lease, attempts, f[1], f[2], f[3], f[4], f[5], f[6] or '', f[7] or '',
    f[8] or '', accepted or '', f[9] or '0', f[10] or '', snapshot, outputs, result,
    f[11] or '0', f[12] or ''}
end

-- A job started with 'keep' set keeps its final event ("<seq> <time> <envelope>", the
-- published form) in its hash, readable after the session's capped log dropped it. ``keep``:
-- the job's field `keep` when the caller read it already (false: none), or nil.
local function keep_final(seq, env, keep)
  if keep == nil then keep = redis.call('HGET', job_key, 'keep') end
  if keep == '1' then
    redis.call('HSET', job_key, 'final', int(seq) .. ' ' .. now_text .. ' ' .. env)
  end
end

"""Lua scripts of the Redis job store. Each one changes a job, its session's bookkeeping and the
session's event log in one atomic step, with Redis's own clock.

Every script takes the same nine keys, all under the tenant's hash tag (one cluster slot):
KEYS[1] job hash, KEYS[2] session hash, KEYS[3] session pending set (every job in flight,
queued or not), KEYS[4] session event sequence counter, KEYS[5] session event stream, KEYS[6]
and KEYS[7] the tenant's sets of pending and running jobs (scored by when the job hash expires;
counted for the tasks-by-state metric), KEYS[8] session line (list of its QUEUED jobs, oldest
first), KEYS[9] the tenant's set of queued jobs (like KEYS[6]). Every script returns
``{status, sequence, now, envelope}`` (only status when nothing was appended).

Event envelopes are assembled here by concatenation: the job id is validated by the caller, the
request id is stored JSON-encoded, and the data is JSON made by the caller.
"""

from __future__ import annotations

_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function envelope(job_id, request_json, kind, data_json)
  return '{"j":"' .. job_id .. '","r":' .. request_json .. ',"k":"' .. kind .. '","d":'
    .. data_json .. '}'
end

-- Append an event: next sequence, stream entry <seq>-0 (capped at maxlen), publish.
local function append(env, maxlen, ttl, channel)
  local seq = redis.call('INCR', KEYS[4])
  redis.call('PEXPIRE', KEYS[4], ttl)
  redis.call('XADD', KEYS[5], 'MAXLEN', maxlen, seq .. '-0', 't', now, 'e', env)
  redis.call('PEXPIRE', KEYS[5], ttl)
  redis.call('PUBLISH', channel, seq .. ' ' .. now .. ' ' .. env)
  return seq
end

-- Keep a key at least ``ttl`` ms longer (a key without a TTL gets one).
local function extend(key, ttl)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end

-- The job is final or gone: it leaves the tenant's sets of unfinished jobs.
local function uncount(job_id)
  redis.call('ZREM', KEYS[6], job_id)
  redis.call('ZREM', KEYS[7], job_id)
  redis.call('ZREM', KEYS[9], job_id)
end

-- The job reached its service or ended: its work spec and hand-off lease go.
local function handed_over()
  redis.call('HDEL', KEYS[1], 'ho', 'hol', 'hoa', 'hoq')
end

-- The job is final: it is no longer counted and leaves the session's pending set (and its
-- line, if it was queued); an idle busy session becomes active again.
local function release(job_id)
  handed_over()
  uncount(job_id)
  redis.call('SREM', KEYS[3], job_id)
  redis.call('LREM', KEYS[8], 1, job_id)
  if redis.call('HGET', KEYS[2], 'state') == 'busy' and redis.call('SCARD', KEYS[3]) == 0 then
    redis.call('HSET', KEYS[2], 'state', 'active', 'updated', now)
  end
end

local function is_final(state)
  return state ~= 'pending' and state ~= 'running' and state ~= 'queued'
end

-- A job started with 'keep' set keeps its final event ("<seq> <time> <envelope>", the
-- published form) in its hash, readable after the session's capped log dropped it.
local function keep_final(seq, env)
  if redis.call('HGET', KEYS[1], 'keep') == '1' then
    redis.call('HSET', KEYS[1], 'final', seq .. ' ' .. now .. ' ' .. env)
  end
end
"""

# ARGV: 1 job_id, 2 session_id, 3 service, 4 kind, 5 request_json, 6 agent_id, 7 model,
# 8 accepted data JSON without its closing brace, 9 deadline_ms, 10 heartbeat_ms,
# 11 job retention_ms, 12 if busy (run | reject | hold), 13 maxlen, 14 ttl, 15 channel,
# 16 cache key, 17 queue timeout_ms, 18 hold ('1': queue it even on an idle session),
# 19 hand-off spec JSON (what the job hash does not hold of the work request, and the work
# queue priority), 20 hand-off grace_ms. The spec stays in field ``ho`` until the job is handed
# over (or ends); ``hol`` is the hand-off's lease (a job not confirmed by then is handed over
# again, see CLAIM_HANDOFF) and ``hoa`` the number of hand-offs started. A QUEUED job's first
# hand-off is its enqueue on the work queue: until that is confirmed (ENQUEUE_DONE, or the
# job is activated) ``hoq`` holds its accepted event's sequence, which the work item carries.
# 21 keep final ('1': the job hash keeps its final event, see _KEEP_FINAL).
# A job id that is already recorded is refused (``job_exists``), and nothing changes.
START = (
    _PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'job_exists'} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {'session_missing'} end
local s = redis.call('HMGET', KEYS[2], 'state', 'expires')
if (s[1] ~= 'active' and s[1] ~= 'busy') or now >= tonumber(s[2]) then
  return {'session_not_open'}
end
local busy = redis.call('SCARD', KEYS[3]) > 0
if ARGV[12] == 'reject' and busy then return {'session_busy'} end
local queued = ARGV[18] == '1' or (ARGV[12] == 'hold' and busy)
local state = 'pending'
local lifetime = tonumber(ARGV[9])
local deadline = now + tonumber(ARGV[9])
local hb = now + tonumber(ARGV[10])
if queued then
  state = 'queued'
  lifetime = tonumber(ARGV[17]) + tonumber(ARGV[9])
  deadline = now + tonumber(ARGV[17])
  hb = deadline
end
redis.call('HSET', KEYS[1], 'session', ARGV[2], 'service', ARGV[3], 'kind', ARGV[4],
  'state', state, 'request', ARGV[5], 'agent', ARGV[6], 'model', ARGV[7],
  'created', now, 'updated', now, 'deadline', deadline, 'hb', hb, 'nseq', 0,
  'ptok', 0, 'ctok', 0, 'ttok', 0, 'ckey', ARGV[16],
  'ho', ARGV[19], 'hol', now + tonumber(ARGV[20]), 'hoa', 1)
if ARGV[21] == '1' then redis.call('HSET', KEYS[1], 'keep', '1') end
lifetime = lifetime + tonumber(ARGV[11])
redis.call('PEXPIRE', KEYS[1], lifetime)
-- Counted as queued or pending until the job ends or its hash expires; jobs that vanished
-- unfinished (their hash expired first) are trimmed here.
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', '(' .. now)
redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', '(' .. now)
redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', '(' .. now)
local counted = KEYS[6]
if queued then counted = KEYS[9] end
redis.call('ZADD', counted, now + lifetime, ARGV[1])
extend(counted, lifetime)
redis.call('SADD', KEYS[3], ARGV[1])
local ttl = redis.call('PTTL', KEYS[2])
if ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) end
if queued then
  redis.call('RPUSH', KEYS[8], ARGV[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[8], ttl) end
end
redis.call('HINCRBY', KEYS[2], 'msgs', 1)
redis.call('HSET', KEYS[2], 'state', 'busy', 'updated', now)
local data = ARGV[8] .. ',"deadline_ms":' .. math.min(deadline, hb)
if queued then data = data .. ',"queued":true' end
data = data .. '}'
local env = envelope(ARGV[1], ARGV[5], 'accepted', data)
local seq = append(env, ARGV[13], tonumber(ARGV[14]), ARGV[15])
if queued then redis.call('HSET', KEYS[1], 'hoq', seq) end
return {'ok', seq, now, env}
"""
)

# ARGV: 1 job_id, 2 service, 3 notice sequence, 4 event, 5 data JSON, 6 heartbeat_ms,
# 7 prompt tokens, 8 completion tokens, 9 total tokens, 10 job retention_ms, 11 maxlen,
# 12 ttl, 13 channel, 14 usage key prefix, 15 usage retention_ms.
# A completed notice also adds its tokens to the tenant's usage hash of the current UTC day
# (``<usage key prefix><days since the epoch>``, by the Redis clock): fields total, prompt,
# completion, jobs and ``agent:<agent id>``. That key is built here because the day comes from
# the Redis clock; the prefix carries the tenant's hash tag, so it lives in the same cluster
# slot as KEYS[1..5].
NOTICE = (
    _PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown_job'} end
local f = redis.call('HMGET', KEYS[1], 'service', 'state', 'nseq', 'request')
if f[1] ~= ARGV[2] then return {'wrong_service'} end
-- A queued job has not been handed to any service yet.
if f[2] == 'queued' then return {'unknown_job'} end
-- Sequence 0: the sender does not number its notices; apply in arrival order.
local n = tonumber(ARGV[3])
if n == 0 then n = tonumber(f[3]) + 1 elseif n <= tonumber(f[3]) then return {'duplicate'} end
if is_final(f[2]) then return {'job_finished'} end
local event = ARGV[4]
if event == 'progress' or event == 'delta' then
  redis.call('HSET', KEYS[1], 'state', 'running', 'nseq', n, 'updated', now,
    'hb', now + tonumber(ARGV[6]))
  if f[2] == 'pending' then
    handed_over()
    local ttl = redis.call('PTTL', KEYS[1])
    redis.call('ZREM', KEYS[6], ARGV[1])
    redis.call('ZADD', KEYS[7], now + ttl, ARGV[1])
    extend(KEYS[7], ttl)
  end
else
  redis.call('HSET', KEYS[1], 'state', event, 'nseq', n, 'updated', now,
    'ptok', ARGV[7], 'ctok', ARGV[8], 'ttok', ARGV[9])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[10]))
  release(ARGV[1])
  if event == 'completed' and redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('HINCRBY', KEYS[2], 'msgs', 1)
    redis.call('HINCRBY', KEYS[2], 'ptok', ARGV[7])
    redis.call('HINCRBY', KEYS[2], 'ctok', ARGV[8])
    redis.call('HINCRBY', KEYS[2], 'ttok', ARGV[9])
  end
  if event == 'completed' then
    local ukey = ARGV[14] .. math.floor(now / 86400000)
    local agent = redis.call('HGET', KEYS[1], 'agent') or ''
    redis.call('HINCRBY', ukey, 'total', ARGV[9])
    redis.call('HINCRBY', ukey, 'prompt', ARGV[7])
    redis.call('HINCRBY', ukey, 'completion', ARGV[8])
    redis.call('HINCRBY', ukey, 'jobs', 1)
    redis.call('HINCRBY', ukey, 'agent:' .. agent, ARGV[9])
    redis.call('PEXPIRE', ukey, tonumber(ARGV[15]))
  end
end
local env = envelope(ARGV[1], f[4], event, ARGV[5])
local seq = append(env, ARGV[11], tonumber(ARGV[12]), ARGV[13])
if event ~= 'progress' and event ~= 'delta' then keep_final(seq, env) end
return {'accepted', seq, now, env}
"""
)

# ARGV: 1 job_id, 2 deadline_ms, 3 heartbeat_ms, 4 job retention_ms, 5 hand-off grace_ms.
# Returns {'started', due} (due: the new deadline) or {reason} (domain.jobs.ActivateOutcome).
ACTIVATE = (
    _PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown_job'} end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'pending' or state == 'running' then return {'already_started'} end
if state ~= 'queued' then return {'final'} end
-- Its work item was delivered, so its enqueue needs no confirmation any more.
redis.call('HDEL', KEYS[1], 'hoq')
local s = redis.call('HMGET', KEYS[2], 'state', 'expires')
if (s[1] ~= 'active' and s[1] ~= 'busy') or now >= tonumber(s[2] or '0') then
  return {'session_not_open'}
end
-- Its turn: first in the line, and every job in flight is in the line (none started).
if redis.call('LINDEX', KEYS[8], 0) ~= ARGV[1]
    or redis.call('SCARD', KEYS[3]) > redis.call('LLEN', KEYS[8]) then
  return {'wait'}
end
redis.call('LPOP', KEYS[8])
local deadline = now + tonumber(ARGV[2])
local hb = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'state', 'pending', 'updated', now, 'deadline', deadline, 'hb', hb,
  'hol', now + tonumber(ARGV[5]), 'hoa', 1)
local lifetime = tonumber(ARGV[2]) + tonumber(ARGV[4])
redis.call('PEXPIRE', KEYS[1], lifetime)
redis.call('ZREM', KEYS[9], ARGV[1])
redis.call('ZADD', KEYS[6], now + lifetime, ARGV[1])
extend(KEYS[6], lifetime)
return {'started', math.min(deadline, hb)}
"""
)

# ARGV: 1 job_id, 2 final state (cancelled | failed | completed from the cache), 3 data JSON,
# 4 job retention_ms, 5 maxlen, 6 ttl, 7 channel
FINISH = (
    _PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown_job'} end
local f = redis.call('HMGET', KEYS[1], 'state', 'request')
if is_final(f[1]) then return {'already_final'} end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'updated', now)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
release(ARGV[1])
-- Completed from the embedding cache: the reply counts as a message, as with a notice.
if ARGV[2] == 'completed' and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'msgs', 1)
end
local env = envelope(ARGV[1], f[2], ARGV[2], ARGV[3])
local seq = append(env, ARGV[5], tonumber(ARGV[6]), ARGV[7])
keep_final(seq, env)
return {'done', seq, now, env}
"""
)

# ARGV: 1 job_id, 2 job retention_ms, 3 maxlen, 4 ttl, 5 channel.
# Returns {'later', due} when a heartbeat moved the deadline, {'gone'} or {'final'}.
REAP = (
    _PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then
  uncount(ARGV[1])
  return {'gone'}
end
local f = redis.call('HMGET', KEYS[1], 'state', 'request', 'deadline', 'hb')
if is_final(f[1]) then return {'final'} end
local due = math.min(tonumber(f[3]), tonumber(f[4]))
if now < due then return {'later', due} end
redis.call('HSET', KEYS[1], 'state', 'timed_out', 'updated', now)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
release(ARGV[1])
local env = envelope(ARGV[1], f[2], 'timed_out', '{"deadline_ms":' .. due .. '}')
local seq = append(env, ARGV[3], tonumber(ARGV[4]), ARGV[5])
keep_final(seq, env)
return {'done', seq, now, env}
"""
)

# KEYS: 1 the job hash (only). ARGV: 1 hand-off grace_ms.
# Extends the lease of a hand-off in progress (a PENDING job with its spec, or a QUEUED job not
# yet confirmed enqueued); returns the new lease, or 0 when there is none to extend (handed
# over, enqueued, ended or gone).
RENEW_HANDOFF = """
local f = redis.call('HMGET', KEYS[1], 'state', 'ho', 'hoq')
if not f[2] or not (f[1] == 'pending' or (f[1] == 'queued' and f[3])) then return 0 end
local t = redis.call('TIME')
local lease = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'hol', lease)
return lease
"""

# ARGV: 1 job_id, 2 hand-off grace_ms, 3 most hand-offs, 4 job retention_ms, 5 maxlen, 6 ttl,
# 7 channel, 8 the failed event's data JSON, with ``{service}`` and ``{attempts}`` to fill in.
# A job with its spec whose lease has passed is claimed: a PENDING one to be handed over again
# ('claimed'), a QUEUED one not confirmed enqueued to be enqueued again ('requeue'); either way
# a new lease and one more hand-off counted. One that has had every hand-off or is past its
# deadline fails here ('exhausted', with its failed event), so nothing happens to it between
# the claim and its end.
# Returns {'gone'} | {'done'} (nothing to hand over) | {'later', lease} |
# {'claimed' | 'requeue' | 'exhausted', lease, attempts, spec, session, service, kind, request,
# agent, model, cache key, accepted sequence (requeue) or ''}.
CLAIM_HANDOFF = (
    _PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
local f = redis.call('HMGET', KEYS[1], 'state', 'ho', 'hol', 'hoa', 'deadline', 'session',
  'service', 'kind', 'request', 'agent', 'model', 'ckey', 'hoq')
local requeue = f[1] == 'queued' and f[13]
if not f[2] or not (f[1] == 'pending' or requeue) then return {'done'} end
local lease = tonumber(f[3] or '0')
if now < lease then return {'later', lease} end
local attempts = tonumber(f[4] or '0')
local reply = {'exhausted', 0, attempts, f[2], f[6], f[7], f[8], f[9], f[10] or '', f[11] or '',
  f[12] or '', requeue and f[13] or ''}
if attempts < tonumber(ARGV[3]) and now < tonumber(f[5]) then
  lease = now + tonumber(ARGV[2])
  attempts = attempts + 1
  redis.call('HSET', KEYS[1], 'hol', lease, 'hoa', attempts)
  reply[1] = requeue and 'requeue' or 'claimed'
  reply[2], reply[3] = lease, attempts
  return reply
end
redis.call('HSET', KEYS[1], 'state', 'failed', 'updated', now)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
release(ARGV[1])
local data = string.gsub((string.gsub(ARGV[8], '{service}', f[7])), '{attempts}', attempts)
append(envelope(ARGV[1], f[9], 'failed', data), ARGV[5], tonumber(ARGV[6]), ARGV[7])
return reply
"""
)

# KEYS: 1 the set of tenants that started jobs, then per tenant of ARGV its sets of queued,
# pending and running jobs (three keys each, in UNFINISHED_STATES order). ARGV: tenant ids.
# Drops from KEYS[1] every listed tenant with no unfinished job left; a start that races with
# this adds its job before it adds its tenant back, so a tenant is never dropped while counted.
PRUNE_TENANTS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dropped = 0
for i, tenant in ipairs(ARGV) do
  local base = 1 + (i - 1) * 3
  local live = 0
  for j = 1, 3 do
    live = live + redis.call('ZCOUNT', KEYS[base + j], now, '+inf')
  end
  if live == 0 then dropped = dropped + redis.call('SREM', KEYS[1], tenant) end
end
return dropped
"""

# ARGV: 1 usage key prefix. The tenant's total tokens of the current UTC day (Redis clock).
USAGE_TODAY = """
local t = redis.call('TIME')
local day = math.floor((tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)) / 86400000)
return tonumber(redis.call('HGET', ARGV[1] .. day, 'total') or '0')
"""

# KEYS: 1 event sequence counter, 2 event stream. ARGV: 1 after, 2 count.
# Returns {last sequence, oldest retained entry id or false, entries after the cursor}.
READ_AFTER = """
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local oldest = false
if #first > 0 then oldest = first[1][1] end
local entries = redis.call('XRANGE', KEYS[2], '(' .. ARGV[1] .. '-0', '+', 'COUNT', ARGV[2])
return {last, oldest, entries}
"""

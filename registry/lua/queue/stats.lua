--! include: prelude/queue
-- Counts the queue's items by where they are.
--
-- KEYS: none (built from the prefix: one hash tag)
-- ARGV: prefix
-- Returns: {ready, leased, delayed, dead}

local ready, leased = 0, 0
for _, stream in ipairs(redis.call('SMEMBERS', prefix .. 'streams')) do
  if redis.call('EXISTS', stream) == 1 then
    local pending = redis.call('XPENDING', stream, group)[1]
    leased = leased + pending
    ready = ready + redis.call('XLEN', stream) - pending
  end
end
return {ready, leased, redis.call('ZCARD', prefix .. 'delayed'), redis.call('XLEN', prefix .. 'dead')}

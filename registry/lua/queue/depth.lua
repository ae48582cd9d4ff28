--! include: prelude/queue
-- The queue's depth per priority level, of one tenant or of all: ready and leased from the
-- (priority, tenant) streams, delayed and dead from the tally hash.
--
-- KEYS: none (built from the prefix: one hash tag)
-- ARGV: prefix, tenant ('' for every tenant)
-- Returns: a flat list of {priority, ready, leased, delayed, dead} per level that has items
local tenant = ARGV[2]

local rows, order = {}, {}
local function row(prio)
  local r = rows[prio]
  if not r then
    r = {prio, 0, 0, 0, 0}
    rows[prio] = r
    order[#order + 1] = prio
  end
  return r
end

local stream_head = prefix .. 's:'
for _, stream in ipairs(redis.call('SMEMBERS', prefix .. 'streams')) do
  local prio, owner = string.match(string.sub(stream, #stream_head + 1), '^([^:]+):(.+)$')
  if prio and (tenant == '' or owner == tenant) and redis.call('EXISTS', stream) == 1 then
    local pending = redis.call('XPENDING', stream, group)[1]
    local r = row(prio)
    r[3] = r[3] + pending
    r[2] = r[2] + redis.call('XLEN', stream) - pending
  end
end
local tallies = redis.call('HGETALL', prefix .. 'tally')
for i = 1, #tallies, 2 do
  local what, prio, owner = string.match(tallies[i], '^([^:]+):([^:]+):(.+)$')
  if what and (tenant == '' or owner == tenant) then
    local r = row(prio)
    local n = tonumber(tallies[i + 1])
    if what == 'delayed' then r[4] = r[4] + n else r[5] = r[5] + n end
  end
end
local out = {}
for _, prio in ipairs(order) do
  for _, v in ipairs(rows[prio]) do out[#out + 1] = v end
end
return out

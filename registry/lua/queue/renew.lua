--! include: prelude/queue
-- Renews the leases a consumer holds: XCLAIM JUSTID resets an entry's idle time, the lease
-- clock.
--
-- KEYS: none (built from the prefix: one hash tag)
-- ARGV: prefix, consumer, then per delivery: stream, entry
-- Returns: per delivery 1 when the consumer still held it (renewed), else 0
local consumer = ARGV[2]
local first_delivery = 3

local res = {}
for i = first_delivery, #ARGV, 2 do
  local stream, entry = unpack(ARGV, i, i + 1)
  if owns(stream, entry, consumer) then
    redis.call('XCLAIM', stream, group, consumer, 0, entry, 'JUSTID')
    res[#res + 1] = 1
  else
    res[#res + 1] = 0
  end
end
return res

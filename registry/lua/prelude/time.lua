-- The Redis server's clock, read once at the start of a script: scripts never take the time
-- from a caller, so the clocks of the replicas do not matter.
-- Defines now (milliseconds since the epoch) and now_us (microseconds).
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local now_us = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

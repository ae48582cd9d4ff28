-- Reads a session's event log after a cursor, with what a follower needs to tell a gap.
--
-- KEYS: event_seq_key (the session's event sequence counter), events_key (its event stream)
-- ARGV: after (the last sequence the reader has), count
-- Returns: {last sequence, oldest retained entry id or false, entries after the cursor}
local event_seq_key = KEYS[1]
local events_key = KEYS[2]
local after = ARGV[1]
local count = ARGV[2]

local last = tonumber(redis.call('GET', event_seq_key) or '0')
local first = redis.call('XRANGE', events_key, '-', '+', 'COUNT', 1)
local oldest = false
if #first > 0 then oldest = first[1][1] end
local entries = redis.call('XRANGE', events_key, '(' .. after .. '-0', '+', 'COUNT', count)
return {last, oldest, entries}

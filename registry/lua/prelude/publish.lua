-- Publishing a session's event to its followers (registry.redis_events).
--
-- ``channel`` is the session's shard channel (SPUBLISH: its slot is the tenant's, the slot of
-- the script's keys), or, during a rolling upgrade from classic pub/sub
-- (ORCH_EVENT_PUBSUB_LEGACY), '<shard channel>\n<classic channel>': published on both.
local function publish_event(channel, message)
  local cut = string.find(channel, '\n', 1, true)
  if cut then
    redis.call('SPUBLISH', string.sub(channel, 1, cut - 1), message)
    redis.call('PUBLISH', string.sub(channel, cut + 1), message)
  else
    redis.call('SPUBLISH', channel, message)
  end
end

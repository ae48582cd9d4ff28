--! include: prelude/queue
-- Adds items to the queue: each new item id gets its record and a stream entry, and its
-- tenant joins the rotation of its priority; an id already known is left as it is. Three
-- commands per item (EXISTS, XADD, HSET); each stream is readied once per call.
--
-- KEYS: none (built from the prefix: one hash tag)
-- ARGV: prefix, then per item: id, tenant, kind, priority, batch ('' for none), payload
-- Returns: how many items were added
local first_item = 2

local rank = {high = 1, normal = 2, low = 3}
local added, prepared, best = 0, {}, 'low'
for i = first_item, #ARGV, 6 do
  local id, tenant, kind, priority, batch, payload = unpack(ARGV, i, i + 5)
  local rec = prefix .. 'i:' .. id
  if redis.call('EXISTS', rec) == 0 then
    local entry = append(id, priority, tenant, prepared)
    -- The fields every later script reads or writes first: a small hash is a list, searched
    -- from its head for each field named.
    redis.call('HSET', rec, 'st', 'queued', 'e', entry, 'n', '0', 't', tenant, 'k', kind,
      'p', priority, 'b', batch, 'd', payload, 'q', now_text)
    added = added + 1
    if (rank[priority] or 3) < rank[best] then best = priority end
  end
end
if added > 0 then redis.call('PUBLISH', prefix .. 'ch:ready', best) end
return added

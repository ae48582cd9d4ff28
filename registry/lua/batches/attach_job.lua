-- Records the job running an item (while the item is RUNNING).
--
-- KEYS: batch_key, states_key, jobs_key
-- ARGV: index (the item's), job ("<job_id> <session_id>")
-- Returns: 1 to keep running, 0 when the item is no longer running or the batch is cancelling
local batch_key, states_key, jobs_key = KEYS[1], KEYS[2], KEYS[3]
local index, job = ARGV[1], ARGV[2]

if redis.call('HGET', states_key, index) ~= 'running' then return 0 end
redis.call('HSET', jobs_key, index, job)
if redis.call('HGET', batch_key, 'state') == 'cancelling' then return 0 end
return 1

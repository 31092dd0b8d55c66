-- Publish a batch of events with the per-series dedup, atomically (stream/redis.py).
--
-- Redis runs a script without interleaving other commands, so the dedup check, the offset
-- assignment and the append are one step: a publisher that re-sends a batch after a crash adds
-- nothing twice, and two publishers can never hand out the same offset.
--
-- KEYS[1]  stream        entries `{offset}-0` with one field ARGV[2] = event JSON
-- KEYS[2]  offset        INCR counter: the last assigned offset (kept apart from the stream so
--                        trimming or an empty stream never resets it)
-- KEYS[3]  last          hash: series -> "{ts} {value}" of the newest published event
-- ARGV[1]  retention     approximate MAXLEN of the stream (`~`: Redis trims whole nodes)
-- ARGV[2]  entry field name
-- ARGV[3..] per event, four values: series, ts (integer string), value ("" for none), JSON
--
-- Returns one integer per event, in order: its offset, or 0 when it was dropped as a duplicate
-- (its ts is not newer than the last published ts of its series, including earlier events of
-- this same batch).

local retention = ARGV[1]
local entry_field = ARGV[2]
local offsets = {}

-- The counter is the source of offsets. Should it be lost while the stream survives (a FLUSH of
-- one key, an eviction policy that is not noeviction), resume after the newest entry instead of
-- failing every XADD with "ID equal or smaller than the target stream top item".
if redis.call('EXISTS', KEYS[2]) == 0 then
  local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if #newest > 0 then
    redis.call('SET', KEYS[2], string.match(newest[1][1], '^(%d+)'))
  end
end

for i = 3, #ARGV, 4 do
  local series = ARGV[i]
  local ts = tonumber(ARGV[i + 1])
  local keep = true
  local last = redis.call('HGET', KEYS[3], series)
  if last then
    local last_ts = tonumber(string.match(last, '^(%-?%d+)'))
    if last_ts ~= nil and ts <= last_ts then
      keep = false
    end
  end
  if keep then
    local offset = redis.call('INCR', KEYS[2])
    -- %d, not `..`: Lua 5.1 would print a large number as 1e+15 and break the id.
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', retention,
               string.format('%d-0', offset), entry_field, ARGV[i + 3])
    -- Recorded per event, so later events of this batch are checked against it.
    redis.call('HSET', KEYS[3], series, ARGV[i + 1] .. ' ' .. ARGV[i + 2])
    offsets[#offsets + 1] = offset
  else
    offsets[#offsets + 1] = 0
  end
end

return offsets

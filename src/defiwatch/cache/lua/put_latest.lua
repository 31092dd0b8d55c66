-- Store hot cache entries, newest ts wins, atomically (cache/redis.py).
--
-- Redis runs a script without interleaving other commands, so reading the stored entry's ts and
-- replacing it is one step: two writers (or a replay racing a live processor) can never let an
-- older entry overwrite a newer one.
--
-- KEYS[1]  hash: series -> Latest JSON (which has an integer "ts" member)
-- ARGV     per entry, three values: series, ts (integer string), JSON
--
-- An equal ts overwrites (same observation, possibly with recomputed windowed changes).
-- Returns how many entries were written; the rest were older than what the hash holds.

local written = 0

for i = 1, #ARGV, 3 do
  local ts = tonumber(ARGV[i + 1])
  local keep = true
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  if current then
    local current_ts = tonumber(cjson.decode(current)['ts'])
    if current_ts ~= nil and current_ts > ts then
      keep = false
    end
  end
  if keep then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
    written = written + 1
  end
end

return written

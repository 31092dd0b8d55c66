-- GCRA rate limit step (api/ratelimit.py `gcra` is the same algorithm in Python).
-- KEYS[1]: the caller's key, holding its theoretical arrival time (TAT) in microseconds.
-- ARGV[1]: emission interval T in microseconds (one minute / limit).
-- ARGV[2]: burst window tau in microseconds (one minute: a full minute's quota at once).
-- Returns {allowed (0/1), remaining, reset_us, retry_after_us}.
-- The clock is the Redis server's, so every API process shares one time line.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then
  tat = now
end
local new_tat = tat + interval
local allow_at = new_tat - tau
if now < allow_at then
  return {0, 0, tat - now, allow_at - now}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1)
return {1, math.floor((tau - (new_tat - now)) / interval), new_tat - now, 0}

-- GCRA over every key of one call, all or nothing, on the Redis server's clock.
--
-- KEYS: the buckets of the call (IP, API key or instance), all in one tier.
-- ARGV[1]: emission interval in microseconds (window / limit).
-- ARGV[2]: the limit (burst).
-- Each bucket stores its theoretical arrival time (TAT) in microseconds and
-- expires when the bucket is whole again, so idle keys cost nothing.
--
-- Returns {admitted, index, micros, remaining}:
--   admitted = 1: index is the tightest bucket, micros the time until it is
--                 whole again, remaining its calls left; every TAT was advanced.
--   admitted = 0: index is the bucket that refused with the longest wait, micros
--                 that wait; nothing was written, so no bucket was spent.
local interval = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local tolerance = interval * limit
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

local new_tats = {}
local refused_index, longest_wait = 0, 0
local tightest_index, fewest_remaining, tightest_reset = 0, limit + 1, 0
for index, key in ipairs(KEYS) do
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then
    tat = now
  end
  local new_tat = tat + interval
  local wait = new_tat - tolerance - now
  if wait > 0 then
    if wait > longest_wait then
      refused_index, longest_wait = index, wait
    end
  else
    local remaining = math.floor((now + tolerance - new_tat) / interval)
    if remaining < fewest_remaining then
      tightest_index, fewest_remaining, tightest_reset = index, remaining, new_tat - now
    end
  end
  new_tats[index] = new_tat
end

if refused_index > 0 then
  return {0, refused_index, longest_wait, 0}
end
for index, key in ipairs(KEYS) do
  local ttl_ms = math.ceil((new_tats[index] - now) / 1000)
  -- %.0f: Lua's default number formatting would round a 16-digit TAT.
  redis.call('SET', key, string.format('%.0f', new_tats[index]), 'PX', ttl_ms)
end
return {1, tightest_index, tightest_reset, fewest_remaining}

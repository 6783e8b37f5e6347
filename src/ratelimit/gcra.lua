-- GCRA over every key of one call, all or nothing, on the Redis server's clock.
--
-- KEYS: the buckets of the call (IP, API key or instance), all in one tier.
-- ARGV[1]: emission interval in microseconds (window / limit).
-- ARGV[2]: the limit (burst).
-- ARGV[3]: calls wanted, at least 1: this call and the ones the replica may
--          then admit on its own (its local allowance, `allowance.rs`).
-- Each bucket stores its theoretical arrival time (TAT) in microseconds and
-- expires when the bucket is whole again, so idle keys cost nothing.
--
-- Returns {admitted, index, micros, remaining, granted}:
--   admitted = 1: granted calls (1 to the wanted number: as many as every
--                 bucket can spare) were spent on every bucket; index is the
--                 tightest bucket, micros the time until it is whole again,
--                 remaining its calls left after the granted ones.
--   admitted = 0: not one call could be spent; index is the bucket that
--                 refused with the longest wait, micros that wait; nothing was
--                 written, so no bucket was spent.
local interval = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local wanted = math.max(1, tonumber(ARGV[3]) or 1)
local tolerance = interval * limit
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

local tats = {}
local refused_index, longest_wait = 0, 0
local granted = wanted
for index, key in ipairs(KEYS) do
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then
    tat = now
  end
  tats[index] = tat
  -- Calls this bucket can take now; at least one, or the call is refused.
  local available = math.floor((now + tolerance - tat) / interval)
  if available < 1 then
    local wait = tat + interval - tolerance - now
    if wait > longest_wait then
      refused_index, longest_wait = index, wait
    end
  elseif available < granted then
    granted = available
  end
end

if refused_index > 0 then
  return {0, refused_index, longest_wait, 0, 0}
end
local tightest_index, fewest_remaining, tightest_reset = 0, limit + 1, 0
for index, key in ipairs(KEYS) do
  local new_tat = tats[index] + granted * interval
  local remaining = math.floor((now + tolerance - new_tat) / interval)
  if remaining < fewest_remaining then
    tightest_index, fewest_remaining, tightest_reset = index, remaining, new_tat - now
  end
  local ttl_ms = math.ceil((new_tat - now) / 1000)
  -- %.0f: Lua's default number formatting would round a 16-digit TAT.
  redis.call('SET', key, string.format('%.0f', new_tat), 'PX', ttl_ms)
end
return {1, tightest_index, tightest_reset, fewest_remaining, granted}

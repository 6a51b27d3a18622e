-- Reserve an amount on every counter of a request, or on none.
--
-- KEYS[1]   reservation record (hash)         KEYS[2]  lease index (zset: id -> deadline ms)
-- KEYS[3..] counter hashes: t / tr = tokens used / reserved, d / dr = micro-USD used / reserved
-- ARGV[1] reservation id      ARGV[2] tokens      ARGV[3] micro-USD
-- ARGV[4] lease deadline (epoch ms)      ARGV[5] record expiry (epoch ms)  ARGV[6] force: "1" = shadow
-- ARGV[7] per counter, in KEYS order: "<token limit> <micro-USD limit> " (-1 = none), all joined
-- ARGV[8] per counter: "<expire-at epoch ms>" joined by "\n" (the window's end plus a margin)
--         (two strings rather than 60 arguments: encoding arguments dominates the client's cost)
-- Returns {status, index, used tokens, reserved tokens, used micro-USD, reserved micro-USD, seen}
--   status 0 refused (nothing written), 1 admitted, 2 duplicate id (nothing written),
--          3 over a limit but written anyway (force); index is the first counter over (0-based).
--   seen: when admitted, {i, t, tr, d, dr, ...} for every limited counter i (0-based) as read
--         before this reservation, so the caller learns the balances without another round trip.
--
-- Every counter is checked before any is written: a Lua error after a write is not rolled back.

if redis.call('EXISTS', KEYS[1]) == 1 then
  return {2, -1, 0, 0, 0, 0, {}}
end

-- Amounts are compared as Lua numbers but written as the caller's own decimal strings:
-- Lua would print a large number as "1e+17", which HINCRBY rejects after earlier writes.
local tokens = tonumber(ARGV[2])
local usd = tonumber(ARGV[3])
local over = nil
local seen = {}
local force = ARGV[6] == '1'

local limits = {}
for n in string.gmatch(ARGV[7], '%S+') do limits[#limits + 1] = tonumber(n) end
local expires = {}
for n in string.gmatch(ARGV[8], '%d+') do expires[#expires + 1] = n end

for i = 3, #KEYS do
  local tl, dl = limits[2 * (i - 3) + 1], limits[2 * (i - 3) + 2]
  if tl >= 0 or dl >= 0 then
    local v = redis.call('HMGET', KEYS[i], 't', 'tr', 'd', 'dr')
    local t, tr = tonumber(v[1]) or 0, tonumber(v[2]) or 0
    local d, dr = tonumber(v[3]) or 0, tonumber(v[4]) or 0
    local n = #seen
    seen[n + 1], seen[n + 2], seen[n + 3], seen[n + 4], seen[n + 5] = i - 3, t, tr, d, dr
    if not over and ((tl >= 0 and t + tr + tokens > tl) or (dl >= 0 and d + dr + usd > dl)) then
      over = {i - 3, t, tr, d, dr}
      if not force then break end
    end
  end
end

if over and not force then
  return {0, over[1], over[2], over[3], over[4], over[5], {}}
end

local keys = {}
for i = 3, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'tr', ARGV[2])
  redis.call('HINCRBY', KEYS[i], 'dr', ARGV[3])
  redis.call('PEXPIREAT', KEYS[i], expires[i - 2])
  keys[#keys + 1] = KEYS[i]
end

redis.call('HSET', KEYS[1], 's', 'r', 't', ARGV[2], 'd', ARGV[3], 'dl', ARGV[4],
           'k', table.concat(keys, '\n'), 'e', ARGV[8])
redis.call('PEXPIREAT', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])

if over then
  return {3, over[1], over[2], over[3], over[4], over[5], seen}
end
return {1, -1, 0, 0, 0, 0, seen}

-- Reserve an amount on every counter of a request, or on none.
--
-- KEYS[1]   reservation record (string)     KEYS[2]  lease index (zset: id -> deadline ms)
-- KEYS[3..] window hashes, one per window the request touches: field "<scope type>:<scope id>"
--           -> struct "<dddd": tokens used, tokens reserved, micro-USD used, micro-USD reserved
--           (doubles: exact below 2^53; one C call to read or write, where text needs four)
-- ARGV[1] reservation id      ARGV[2] tokens      ARGV[3] micro-USD
-- ARGV[4] lease deadline (epoch ms)      ARGV[5] record expiry (epoch ms)   ARGV[6] "1" = force
-- ARGV[7] what the settlement log needs to know about the request (opaque; kept in the record)
-- ARGV[8..] the counters, per window in KEYS order: <expire-at epoch ms> <n> <n fields>
--           <token limit> <micro-USD limit> (n pairs; -1 = none)
-- Returns {status, index, used tokens, reserved tokens, used micro-USD, reserved micro-USD, seen}
--   status 0 refused (nothing written), 1 admitted, 2 duplicate id (nothing written),
--          3 over a limit but written anyway (force); index: the first counter over (0-based,
--          counting fields in ARGV order).
--   seen: when admitted, {i, t, tr, d, dr, ...} for every limited counter i (0-based) as read
--         before this reservation, so the caller learns the balances without another round trip.
-- Record: "r <deadline> <tokens> <micro-USD>\n<KEYS[3..]>\n<ARGV[8..]>\n<ARGV[7]>" (space-joined
--         lists), so the sweeper knows the counters and the log the request.
--
-- Every counter is checked before any is written: a Lua error after a write is not rolled back.
-- A window hash gets its expiry when one of the fields written was absent (it may be new), so
-- each hash is expired once per scope and window, not on every call.

if redis.call('EXISTS', KEYS[1]) == 1 then
  return {2, -1, 0, 0, 0, 0, {}}
end

local tokens, usd = tonumber(ARGV[2]), tonumber(ARGV[3])
local force = ARGV[6] == '1'
local over, seen = nil, {}
local unpack, tonumber, sunpack, spack = unpack, tonumber, struct.unpack, struct.pack
local writes = {}
local index = 0
local a = 8

for w = 3, #KEYS do
  local n = tonumber(ARGV[a + 1])
  local first, limits = a + 2, a + 2 + n
  local vals = redis.call('HMGET', KEYS[w], unpack(ARGV, first, first + n - 1))
  local args, fresh = {}, false
  for j = 1, n do
    local t, tr, d, dr = 0, 0, 0, 0
    if vals[j] then t, tr, d, dr = sunpack('<dddd', vals[j]) else fresh = true end
    local tl, dl = tonumber(ARGV[limits + 2 * j - 2]), tonumber(ARGV[limits + 2 * j - 1])
    if tl >= 0 or dl >= 0 then
      local s = #seen
      seen[s + 1], seen[s + 2], seen[s + 3], seen[s + 4], seen[s + 5] = index, t, tr, d, dr
      if not over and ((tl >= 0 and t + tr + tokens > tl) or (dl >= 0 and d + dr + usd > dl)) then
        if not force then return {0, index, t, tr, d, dr, {}} end
        over = {index, t, tr, d, dr}
      end
    end
    args[2 * j - 1] = ARGV[first + j - 1]
    args[2 * j] = spack('<dddd', t, tr + tokens, d, dr + usd)
    index = index + 1
  end
  writes[#writes + 1] = {KEYS[w], args, fresh and ARGV[a]}
  a = limits + 2 * n
end

redis.call('SET', KEYS[1], 'r ' .. ARGV[4] .. ' ' .. ARGV[2] .. ' ' .. ARGV[3] .. '\n' ..
           table.concat(KEYS, ' ', 3) .. '\n' .. table.concat(ARGV, ' ', 8) .. '\n' .. ARGV[7],
           'PXAT', ARGV[5])
for i = 1, #writes do
  local wr = writes[i]
  redis.call('HSET', wr[1], unpack(wr[2]))
  if wr[3] then redis.call('PEXPIREAT', wr[1], wr[3]) end
end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])

if over then
  return {3, over[1], over[2], over[3], over[4], over[5], seen}
end
return {1, -1, 0, 0, 0, 0, seen}

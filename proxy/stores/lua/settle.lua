-- Settle a reservation: move it from reserved to used with the actual amounts.
--
-- KEYS[1]   reservation record (hash)         KEYS[2]  lease index (zset)
-- KEYS[3..] the reservation's counter hashes, in reserve order
-- ARGV[1] reservation id
-- ARGV[2] actual tokens, ARGV[3] actual micro-USD: 0 0 releases; -1 -1 charges what was reserved
-- ARGV[4] TTL (ms) of the settled record, kept so a repeated settle is a no-op
-- ARGV[5] not-after (epoch ms): when > 0, settle only if the lease deadline is <= it (expiry)
-- ARGV[6] expire-at (epoch ms) per counter joined by "\n", used only where a counter's key has
--         vanished (a restart): the usage is recorded again with the window's expiry
-- Returns 1 if settled now, 0 if already settled, not yet expired, or (expiry) unknown.

local state = redis.call('HMGET', KEYS[1], 's', 't', 'd', 'dl')
local not_after = tonumber(ARGV[5])
if state[1] then
  if state[1] ~= 'r' then return 0 end
  if not_after > 0 and tonumber(state[4]) > not_after then return 0 end
elseif not_after > 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])   -- a lease whose record is gone: nothing left to settle
  return 0
end

-- A missing record on commit means the store lost it (a restart): the usage is still real.
local res_t, res_d = tonumber(state[2]) or 0, tonumber(state[3]) or 0
local tokens, usd = tonumber(ARGV[2]), tonumber(ARGV[3])
if tokens < 0 then tokens, usd = res_t, res_d end

local expires = nil
for i = 3, #KEYS do
  local k = KEYS[i]
  if redis.call('EXISTS', k) == 1 then
    if res_t ~= 0 and redis.call('HINCRBY', k, 'tr', -res_t) < 0 then redis.call('HSET', k, 'tr', 0) end
    if res_d ~= 0 and redis.call('HINCRBY', k, 'dr', -res_d) < 0 then redis.call('HSET', k, 'dr', 0) end
    if tokens ~= 0 then redis.call('HINCRBY', k, 't', tokens) end
    if usd ~= 0 then redis.call('HINCRBY', k, 'd', usd) end
  elseif tokens ~= 0 or usd ~= 0 then
    if not expires then
      expires = {}
      for n in string.gmatch(ARGV[6], '%d+') do expires[#expires + 1] = n end
    end
    redis.call('HSET', k, 't', tokens, 'd', usd)
    redis.call('PEXPIREAT', k, expires[i - 2])
  end
end

redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 's', 'c', 't', res_t, 'd', res_d)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1

-- Settle a reservation: commit (reserved -> used at the actual amounts), release (nothing used)
-- or expire (the sweeper, for a lease whose deadline has passed).
--
-- KEYS[1]   reservation record (hash)         KEYS[2]  lease index (zset)
-- KEYS[3..] the reservation's counter hashes, in reserve order
-- ARGV[1] reservation id
-- ARGV[2] actual tokens, ARGV[3] actual micro-USD (commit; release passes 0 0)
-- ARGV[4] TTL (ms) of the settled record, kept so a repeated settle is a no-op
-- ARGV[5] mode: "commit" (also release) or "expire" (only if the lease deadline <= ARGV[8]);
--         an expired record stays (state x, with what was charged) until ARGV[7], so the late
--         commit or release of a live request corrects the charge exactly once
-- ARGV[6] expire-at (epoch ms) per counter joined by "\n", used where a counter's key has vanished
-- ARGV[7] epoch ms until which an expired-lease record is kept (its counters' last expiry)
-- ARGV[8] expire only: now (epoch ms)     ARGV[9] expire only: "1" charge what was reserved, "0" not
-- Returns 1 if settled (or corrected) now; 0 if already settled, not yet expired, or unknown.
--
-- Numbers written back are formatted with %d: Lua prints large numbers as 1e+15, which HINCRBY
-- rejects. Amounts are below 2^50, exact in a Lua number.

local function incr(key, field, n)
  if n ~= 0 then return redis.call('HINCRBY', key, field, string.format('%d', n)) end
  return nil
end

local expires = nil
local function expire_at(i)
  if not expires then
    expires = {}
    for n in string.gmatch(ARGV[6], '%d+') do expires[#expires + 1] = n end
  end
  return expires[i]
end

-- Add used amounts (and take back reserved ones) on every counter. A counter whose key has
-- vanished (a restart) gets the usage again with its window's expiry, nothing to take back.
local function apply(used_t, used_d, res_t, res_d)
  for i = 3, #KEYS do
    local k = KEYS[i]
    if redis.call('EXISTS', k) == 1 then
      local tr = incr(k, 'tr', -res_t)
      if tr and tr < 0 then redis.call('HSET', k, 'tr', 0) end
      local dr = incr(k, 'dr', -res_d)
      if dr and dr < 0 then redis.call('HSET', k, 'dr', 0) end
      incr(k, 't', used_t)
      incr(k, 'd', used_d)
    elseif used_t > 0 or used_d > 0 then
      redis.call('HSET', k, 't', string.format('%d', math.max(used_t, 0)),
                 'd', string.format('%d', math.max(used_d, 0)))
      redis.call('PEXPIREAT', k, expire_at(i - 2))
    end
  end
end

local function settled(state, t, d)
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 's', state, 't', string.format('%d', t), 'd', string.format('%d', d))
  redis.call('ZREM', KEYS[2], ARGV[1])
end

local rec = redis.call('HMGET', KEYS[1], 's', 't', 'd', 'dl')
local state = rec[1]
local res_t, res_d = tonumber(rec[2]) or 0, tonumber(rec[3]) or 0
local tokens, usd = tonumber(ARGV[2]), tonumber(ARGV[3])

if ARGV[5] == 'expire' then                            -- the sweeper, for an expired lease
  if state ~= 'r' then
    if not state then redis.call('ZREM', KEYS[2], ARGV[1]) end
    return 0
  end
  if tonumber(rec[4]) > tonumber(ARGV[8]) then return 0 end
  if ARGV[9] == '1' then tokens, usd = res_t, res_d else tokens, usd = 0, 0 end
  apply(tokens, usd, res_t, res_d)
  settled('x', tokens, usd)                            -- t, d now hold what was charged
  redis.call('PEXPIREAT', KEYS[1], ARGV[7])
  return 1
end

if state == 'r' then
  apply(tokens, usd, res_t, res_d)
elseif state == 'x' then                               -- late commit: correct the sweeper's charge
  apply(tokens - res_t, usd - res_d, 0, 0)
elseif state then
  return 0                                             -- already settled
else
  apply(tokens, usd, 0, 0)                             -- the store lost the record; usage is real
end
settled('c', 0, 0)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1

-- Settle a reservation: commit (reserved -> used at the actual amounts), release (nothing used),
-- or expire (the sweeper, for a lease whose deadline has passed).
--
-- Defines settle(KEYS, ARGV); run alone as direct.lua .. this .. "return settle(KEYS, ARGV)",
-- or as one sub-call of batch.lua (see there). Window hashes and the lease index are touched
-- only through the helpers hash_read + value, hash_set + hash_commit, hash_expire and
-- lease_remove (direct.lua, cached.lua); the record's GET / SET and the log's XADD are Redis
-- commands in both forms.
--
-- KEYS[1]   reservation record (string, see reserve.lua)     KEYS[2]  lease index (zset)
-- KEYS[3]   settlement log (stream)         KEYS[4..] the reservation's window hashes (as in reserve.lua)
-- ARGV[1] reservation id    ARGV[2] mode: "commit", "release" or "expire"
-- ARGV[3] actual tokens, ARGV[4] actual micro-USD (commit; 0 otherwise)
-- ARGV[5] TTL (ms) of a settled record, kept so a repeated settle is a no-op
-- ARGV[6] expire only: now (epoch ms); only a lease whose deadline is <= now is settled
-- ARGV[7] expire only: "1" charge what was reserved, "0" charge nothing
-- ARGV[8] expire only: epoch ms until which the expired record is kept (its windows' last expiry)
-- ARGV[9] outcome for the log (commit, release)   ARGV[10] usage "<prompt> <cached> <completion>
--         <reasoning>" or ""   ARGV[11] upstream latency ms or ""   ARGV[12] log length (approximate cap)
-- ARGV[13] ARGV[14..] space-joined, for the log entry
-- ARGV[14..] the counters, per window in KEYS order: <expire-at epoch ms> <n> <n fields>
-- Returns 1 if settled (or corrected) now; 0 if already settled, not yet due, or unknown.
--
-- Every settlement appends one log entry in this same call (so log and counters cannot disagree):
--   id, o outcome (expire: "expired"; a late commit or release after it: "corrected"),
--   ct / cd tokens / micro-USD the used counters moved by (a correction: the delta),
--   u usage, l latency, i the request info kept from reserve, w window keys charged (space-joined),
--   c the counters charged (ARGV[13]: per window <expire-at> <n> <n fields>).
-- Order: the record (GET or SET ... GET), the window hashes read, the log entry and the record's
-- new state written, and only then the helper writes (window hashes, expiry, lease), which
-- cannot fail in a batch: an error (a key of the wrong type, say) comes before any of them, and
-- the counters never move without their log entry.
--
-- Record states: "r ..." open; "x <deadline> <charged tokens> <charged micro-USD>\n..." settled by
-- the sweeper, kept so that the late commit or release of a live request corrects the charge to
-- its actual amounts, once; "c" settled.

-- Every window hash as hash_read gives it: whether it is new, and its values, by KEYS index.
local function settle_read(KEYS, ARGV)
  local num = num
  local fresh, reads, a = {}, {}, 14
  for w = 4, #KEYS do
    local n = num(ARGV[a + 1])
    fresh[w], reads[w] = hash_read(KEYS[w], ARGV, a + 2, n)
    a = a + 2 + n
  end
  return fresh, reads
end

-- Add used amounts (and take back reserved ones) on every counter. A field that has vanished
-- (a restart, or the window expired) gets the usage again, nothing to take back.
local function settle_write(KEYS, ARGV, fresh, reads, used_t, used_d, res_t, res_d)
  local num, max = num, math.max
  local a = 14
  for w = 4, #KEYS do
    local n = num(ARGV[a + 1])
    local first, vals, key = a + 2, reads[w], KEYS[w]
    local written = false
    for j = 1, n do
      local t, tr, d, dr = value(vals, j)
      if t then
        hash_set(key, ARGV[first + j - 1], max(t + used_t, 0), max(tr - res_t, 0),
                 max(d + used_d, 0), max(dr - res_d, 0))
        written = true
      elseif used_t > 0 or used_d > 0 then
        hash_set(key, ARGV[first + j - 1], max(used_t, 0), 0, max(used_d, 0), 0)
        written = true
      end
    end
    if written then
      hash_commit(key)
      if fresh[w] then hash_expire(key, ARGV[a]) end     -- a new hash (its marker "_" was absent)
    end
    a = first + n
  end
end

-- Amounts go to XADD as Lua numbers: Redis 7 writes integers below 2^53 exactly.
local function settle_log(KEYS, ARGV, outcome, t, d, rec)
  local info = rec and string.match(rec, '^[^\n]*\n([^\n]*)') or ''
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[12], '*', 'id', ARGV[1], 'o', outcome, 'ct', t, 'cd', d,
             'u', ARGV[10], 'l', ARGV[11], 'i', info, 'w', table.concat(KEYS, ' ', 4), 'c', ARGV[13])
end

local function settle(KEYS, ARGV)
  local tonumber = tonumber
  local mode = ARGV[2]

  if mode == 'expire' then
    local rec = redis.call('GET', KEYS[1])
    if not rec then
      lease_remove(KEYS[2], ARGV[1])                     -- forgotten: nothing left to settle
      return 0
    end
    local state, deadline, res_t, res_d, rest = string.match(rec, '^(%a) (%d+) (%d+) (%d+)(.*)$')
    if state ~= 'r' or tonumber(deadline) > tonumber(ARGV[6]) then return 0 end
    res_t, res_d = tonumber(res_t), tonumber(res_d)
    local t, d = 0, 0
    if ARGV[7] == '1' then t, d = res_t, res_d end
    local fresh, reads = settle_read(KEYS, ARGV)
    settle_log(KEYS, ARGV, 'expired', t, d, rec)
    redis.call('SET', KEYS[1], 'x ' .. deadline .. ' ' .. string.format('%d %d', t, d) .. rest, 'PXAT', ARGV[8])
    settle_write(KEYS, ARGV, fresh, reads, t, d, res_t, res_d)
    lease_remove(KEYS[2], ARGV[1])
    return 1
  end

  -- commit or release: whatever the state was, the record ends settled ("c").
  local tokens, usd = tonumber(ARGV[3]), tonumber(ARGV[4])
  local rec = redis.call('SET', KEYS[1], 'c', 'PX', ARGV[5], 'GET')
  if not rec then                                        -- the store lost the record; usage is real
    local fresh, reads = settle_read(KEYS, ARGV)
    settle_log(KEYS, ARGV, ARGV[9], tokens, usd, nil)
    settle_write(KEYS, ARGV, fresh, reads, tokens, usd, 0, 0)
    return 1
  end
  local state, _, res_t, res_d = string.match(rec, '^(%a) (%d+) (%d+) (%d+)')
  if state == 'r' then
    local fresh, reads = settle_read(KEYS, ARGV)
    settle_log(KEYS, ARGV, ARGV[9], tokens, usd, rec)
    settle_write(KEYS, ARGV, fresh, reads, tokens, usd, tonumber(res_t), tonumber(res_d))
    lease_remove(KEYS[2], ARGV[1])
    return 1
  elseif state == 'x' then                               -- late: correct the sweeper's charge
    local t, d = tokens - tonumber(res_t), usd - tonumber(res_d)
    local fresh, reads = settle_read(KEYS, ARGV)
    settle_log(KEYS, ARGV, 'corrected', t, d, rec)
    settle_write(KEYS, ARGV, fresh, reads, t, d, 0, 0)
    return 1
  end
  return 0                                               -- already settled
end

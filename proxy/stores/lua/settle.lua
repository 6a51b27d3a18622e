-- Settle a reservation: commit (reserved -> used at the actual amounts), release (nothing used),
-- or expire (the sweeper, for a lease whose deadline has passed).
--
-- Defines settle(K, k, A, a, plan): the call's keys are K[k .. k + 2] (KEYS[1..3] below), its
-- own arguments A[a .. a + 11] (ARGV[1..12]), its window hashes and counters the plan (plan.lua:
-- KEYS[4..] and ARGV[13..], read once). Run alone as direct.lua .. plan.lua .. this ..
-- "return settle(KEYS, 1, ARGV, 1, settle_plan(KEYS, 4, #KEYS - 3, ARGV, 13))", or as one
-- sub-call of batch.lua (see there). Window hashes and the lease index are touched
-- only through the helpers hash_read, hash_write, hash_expire and
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

-- Every window hash as hash_read gives it: whether it is new, and its values, by window. Read
-- before the log entry (errors first); the values themselves are used only by settle_fields,
-- after it (hence `true`: a batch need not bring them up to date yet, see cached.lua).
local function settle_read(plan)
  local fresh, reads = plan.fresh, plan.reads
  for w = 1, plan.nw do
    fresh[w], reads[w] = hash_read(plan, w, true)
  end
  return fresh, reads
end

-- Add used amounts (and take back reserved ones) on every counter. A field that has vanished
-- (a restart, or the window expired) gets the usage again, nothing to take back.
local function settle_fields(plan, fresh, reads, used_t, used_d, res_t, res_d)
  local P, keys, first, n = plan.A, plan.keys, plan.first, plan.n
  for w = 1, plan.nw do                  -- each value table changed in place (see hash_read)
    local vals, lo, written = reads[w], first[w], false
    local hi = lo + n[w] - 1
    for i = lo, hi do
      local f = P[i]
      local x = vals[f]
      if x then                                          -- each at least 0 (math.max, inline)
        local t, tr, d, dr = x[1] + used_t, x[2] - res_t, x[3] + used_d, x[4] - res_d
        if t < 0 then t = 0 end
        if tr < 0 then tr = 0 end
        if d < 0 then d = 0 end
        if dr < 0 then dr = 0 end
        x[1], x[2], x[3], x[4] = t, tr, d, dr
        written = true
      elseif used_t > 0 or used_d > 0 then
        vals[f] = {used_t > 0 and used_t or 0, 0, used_d > 0 and used_d or 0, 0}
        written = true
      end
    end
    if written then
      hash_write(keys[w], vals, P, lo, hi)
      if fresh[w] then hash_expire(keys[w], P[plan.exp[w]]) end -- a new hash (its marker "_" was absent)
    end
  end
end

-- settle_fields now, or, in a batch, later: added up with the plan's other settles (settle_later,
-- cached.lua; a single call has none: direct.lua).
local function settle_write(plan, fresh, reads, used_t, used_d, res_t, res_d)
  if not settle_later(plan, fresh, used_t, used_d, res_t, res_d, settle_fields) then
    settle_fields(plan, fresh, reads, used_t, used_d, res_t, res_d)
  end
end

-- Amounts go to XADD as given: the caller's own argument text, or a Lua number (a delta), which
-- Redis 7 writes exactly below 2^53. The window keys are joined once per plan.
local function settle_log(K, k, A, a, plan, outcome, t, d, info)
  local wkeys = plan.wkeys
  if not wkeys then
    wkeys = table.concat(plan.keys, ' ')
    plan.wkeys = wkeys
  end
  redis.call('XADD', K[k + 2], 'MAXLEN', '~', A[a + 11], '*', 'id', A[a], 'o', outcome, 'ct', t, 'cd', d,
             'u', A[a + 9], 'l', A[a + 10], 'i', info, 'w', wkeys, 'c', plan.A[plan.rec])
end

local function settle(K, k, A, a, plan)
  local tonumber = tonumber
  local mode = A[a + 1]

  if mode == 'expire' then
    local rec = redis.call('GET', K[k])
    if not rec then
      lease_remove(K[k + 1], A[a])                       -- forgotten: nothing left to settle
      return 0
    end
    local state, deadline, res_t, res_d, rest = string.match(rec, '^(%a) (%d+) (%d+) (%d+)(.*)$')
    if state ~= 'r' or tonumber(deadline) > tonumber(A[a + 5]) then return 0 end
    res_t, res_d = tonumber(res_t), tonumber(res_d)
    local t, d = 0, 0
    if A[a + 6] == '1' then t, d = res_t, res_d end
    local fresh, reads = settle_read(plan)
    settle_log(K, k, A, a, plan, 'expired', t, d, string.match(rest, '^\n([^\n]*)') or '')
    redis.call('SET', K[k], 'x ' .. deadline .. ' ' .. string.format('%d %d', t, d) .. rest, 'PXAT', A[a + 7])
    settle_write(plan, fresh, reads, t, d, res_t, res_d)
    lease_remove(K[k + 1], A[a])
    return 1
  end

  -- commit or release: whatever the state was, the record ends settled ("c").
  local tokens, usd = A[a + 2] + 0, A[a + 3] + 0         -- `+ 0`: see plan.lua
  local rec = redis.call('SET', K[k], 'c', 'PX', A[a + 4], 'GET')
  if not rec then                                        -- the store lost the record; usage is real
    local fresh, reads = settle_read(plan)
    settle_log(K, k, A, a, plan, A[a + 8], A[a + 2], A[a + 3], '')
    settle_write(plan, fresh, reads, tokens, usd, 0, 0)
    return 1
  end
  -- One match: the state, the amounts reserved (or charged by the sweeper), where the request
  -- starts; it ends at the next newline, found by a plain find (a memchr, where `[^\n]*` in the
  -- pattern tested each of its characters against the class: 2,700 instructions a commit).
  local state, _, res_t, res_d, from = string.match(rec, '^(%a) (%d+) (%d+) (%d+)\n()')
  local info
  if from then info = string.sub(rec, from, (string.find(rec, '\n', from, true) or 0) - 1) end
  if state == 'r' then
    local fresh, reads = settle_read(plan)
    settle_log(K, k, A, a, plan, A[a + 8], A[a + 2], A[a + 3], info)
    settle_write(plan, fresh, reads, tokens, usd, res_t + 0, res_d + 0)
    lease_remove(K[k + 1], A[a])
    return 1
  elseif state == 'x' then                               -- late: correct the sweeper's charge
    local t, d = tokens - res_t, usd - res_d
    local fresh, reads = settle_read(plan)
    settle_log(K, k, A, a, plan, 'corrected', t, d, info)
    settle_write(plan, fresh, reads, t, d, 0, 0)
    return 1
  end
  return 0                                               -- already settled
end

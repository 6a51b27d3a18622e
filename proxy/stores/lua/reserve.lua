-- Reserve an amount on every counter of a request, or on none.
--
-- Defines reserve(K, k, A, a, plan): the call's keys are K[k], K[k + 1] (KEYS[1], KEYS[2] below),
-- its own arguments A[a .. a + 6] (ARGV[1..7]), its window hashes and counters the plan
-- (plan.lua: KEYS[3..] and ARGV[8..], read once). Run alone as direct.lua .. plan.lua .. this ..
-- "return reserve(KEYS, 1, ARGV, 1, reserve_plan(KEYS, 3, #KEYS - 2, ARGV, 8))", or as one
-- sub-call of batch.lua (see there). Window hashes and the lease index are touched only through
-- the helpers hash_read, hash_get, hash_write, hash_expire and lease_add:
-- Redis commands alone (direct.lua), a per-batch cache in a batch (cached.lua). The record's
-- SET NX and EXISTS are Redis commands in both forms.
--
-- KEYS[1]   reservation record (string)     KEYS[2]  lease index (zset: id -> deadline ms)
-- KEYS[3..] window hashes, one per window the request touches: field "<scope type>:<scope id>"
--           -> struct "<dddd": tokens used, tokens reserved, micro-USD used, micro-USD reserved
--           (doubles: exact below 2^53; one C call to read or write, where text needs four)
-- ARGV[1] reservation id      ARGV[2] tokens      ARGV[3] micro-USD
-- ARGV[4] lease deadline (epoch ms)      ARGV[5] record expiry (epoch ms)   ARGV[6] "1" = force
-- ARGV[7] the request, for the settlement log (one line, opaque)
-- ARGV[8] the counters as settle.lua takes them, space-joined (kept in the record for the sweeper)
-- ARGV[9..] the counters, per window in KEYS order: <expire-at epoch ms> <n> <n fields> <m> then
--           m limited fields as <position 1..n> <token limit> <micro-USD limit> (-1 = none;
--           < -1 = a leased allowance, cluster store only: the limit is what the field's "~<field>"
--           holds, granted minus returned, see lend.lua; the field is then reported relative to
--           it, used minus allowance, so that used + reserved + amount > 0 is exactly the shortfall)
-- Returns admitted: {1, seen...}; refused: {0, index, used tokens, reserved tokens, used
--   micro-USD, reserved micro-USD} (nothing written); forced (over a limit but written anyway):
--   {3, index, the same four, seen...}; a duplicate id: {2} (nothing written). index: the first
--   counter over (0-based, counting fields in ARGV order). The admitted reply leaves out the
--   five values of a counter over that it never has: each value of a reply costs Redis about
--   500 instructions to turn from Lua into the protocol.
--   seen...: when admitted or forced, for every limited counter, in ARGV order, as read before
--         this reservation: t, tr if it limits tokens, d, dr if it limits micro-USD (both: t, tr,
--         d, dr), so the caller learns the balances without another round trip (it knows which
--         counters are limited, and in what: wire.py Wire.limited). Flat in the reply, not a
--         nested table of (index, values), and only the units limited (the bench's policy
--         limits each counter in one unit: 10 values instead of 20, -2.5 % of a batched
--         request's Redis instructions).
-- Record: "r <deadline> <tokens> <micro-USD>\n<ARGV[7]>\n<KEYS[3..] space-joined>\n<ARGV[8]>"
--         (the request first: settle.lua reads it with an anchored pattern, not a scan).
--
-- Every counter is checked before any is written: a Lua error after a write is not rolled back.
-- Order: reads and checks, then the record's SET NX (the only command after the reads that can
-- fail), then only helper writes (window hashes, expiry, lease), which cannot fail in a batch.
-- A repeated id (redis-py retrying a call that ran) is found by the record's SET NX, or, when the
-- counters now refuse (they hold this id's own reservation), by EXISTS on that path only.
-- Each window hash carries a marker field "_": read with the counters (no extra command), it
-- says whether the hash is new, so PEXPIREAT runs once per window hash, not once per call.

local DUPLICATE = {2}

-- The record's text after the request: "\n<window keys>\n<counters>", once per plan.
local function record_tail(plan)
  local tail = plan.tail
  if not tail then
    tail = '\n' .. table.concat(plan.keys, ' ') .. '\n' .. plan.A[plan.rec]
    plan.tail = tail
  end
  return tail
end

local function reserve(K, k, A, a, plan)
  local tokens, usd = A[a + 1] + 0, A[a + 2] + 0         -- `+ 0`: see plan.lua
  local force = A[a + 5] == '1'
  local P, keys, first, n, lim = plan.A, plan.keys, plan.first, plan.n, plan.lim
  local over, out, ns = nil, {unpack(plan.reply)}, 1
  local reads, fresh = plan.reads, plan.fresh
  local base = 0

  for w = 1, plan.nw do
    local is_new, vals = hash_read(plan, w)
    fresh[w], reads[w] = is_new, vals
    local l, f0 = lim[w], first[w] - 1
    for x = 1, #l, 3 do
      local j, tl, dl = l[x], l[x + 1], l[x + 2]
      local t, tr, d, dr, x = 0, 0, 0, 0, vals[P[f0 + j]]
      if x then t, tr, d, dr = x[1], x[2], x[3], x[4] end
      if tl < -1 or dl < -1 then
        local gt, rt, gd, rd = hash_get(keys[w], '~' .. P[f0 + j])
        if not gt then gt, rt, gd, rd = 0, 0, 0, 0 end
        if tl < -1 then t, tl = t - (gt - rt), 0 end
        if dl < -1 then d, dl = d - (gd - rd), 0 end
      end
      if dl == -1 then                   -- the units it limits (-1: not; an allowance is a limit)
        out[ns + 1], out[ns + 2] = t, tr
        ns = ns + 2
      elseif tl == -1 then
        out[ns + 1], out[ns + 2] = d, dr
        ns = ns + 2
      else
        out[ns + 1], out[ns + 2], out[ns + 3], out[ns + 4] = t, tr, d, dr
        ns = ns + 4
      end
      if not over and ((tl >= 0 and t + tr + tokens > tl) or (dl >= 0 and d + dr + usd > dl)) then
        if not force then
          if redis.call('EXISTS', K[k]) == 1 then return DUPLICATE end   -- a retry, once admitted
          return {0, base + j - 1, t, tr, d, dr}
        end
        over = {base + j - 1, t, tr, d, dr}
      end
    end
    base = base + n[w]
  end

  -- The record is the first write, NX: if this id already reserved, nothing has been written yet.
  if not redis.call('SET', K[k], 'r ' .. A[a + 3] .. ' ' .. A[a + 1] .. ' ' .. A[a + 2] .. '\n' .. A[a + 6] ..
                    record_tail(plan), 'NX', 'PXAT', A[a + 4]) then
    return DUPLICATE
  end
  for w = 1, plan.nw do                  -- each value table changed in place (see hash_read)
    local vals, lo = reads[w], first[w]
    local hi = lo + n[w] - 1
    for i = lo, hi do
      local f = P[i]
      local x = vals[f]
      if x then x[2], x[4] = x[2] + tokens, x[4] + usd else vals[f] = {0, tokens, 0, usd} end
    end
    hash_write(keys[w], vals, P, lo, hi)
    if fresh[w] then hash_expire(keys[w], P[plan.exp[w]]) end
  end
  lease_add(K[k + 1], A[a + 3], A[a])

  if over then
    return {3, over[1], over[2], over[3], over[4], over[5], unpack(out, 2, ns)}
  end
  return out
end

-- Reserve an amount on every counter of a request, or on none.
--
-- Defines reserve(KEYS, ARGV); run alone as direct.lua .. this .. "return reserve(KEYS, ARGV)",
-- or as one sub-call of batch.lua (see there). Window hashes and the lease index are touched
-- only through the helpers hash_read + value, hash_get, hash_set + hash_commit, hash_expire and
-- lease_add: Redis commands alone (direct.lua), a per-batch cache in a batch (cached.lua). The
-- record's SET NX and EXISTS are Redis commands in both forms.
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
-- Returns {status, index, used tokens, reserved tokens, used micro-USD, reserved micro-USD, seen}
--   status 0 refused (nothing written), 1 admitted, 2 duplicate id (nothing written),
--          3 over a limit but written anyway (force); index: the first counter over (0-based,
--          counting fields in ARGV order).
--   seen: when admitted, {i, t, tr, d, dr, ...} for every limited counter i (0-based) as read
--         before this reservation, so the caller learns the balances without another round trip.
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

local DUPLICATE = {2, -1, 0, 0, 0, 0, {}}

local function reserve(KEYS, ARGV)
  local num = num
  local tokens, usd = tonumber(ARGV[2]), tonumber(ARGV[3])
  local force = ARGV[6] == '1'
  local over, seen, ns = nil, {}, 0
  local reads, fresh = {}, {}
  local base, a = 0, 9

  for w = 3, #KEYS do
    local n = num(ARGV[a + 1])
    local first = a + 2
    local is_new, vals = hash_read(KEYS[w], ARGV, first, n)
    fresh[w], reads[w] = is_new, vals
    local l = first + n
    for k = l + 1, l + 3 * num(ARGV[l]), 3 do
      local j, tl, dl = num(ARGV[k]), num(ARGV[k + 1]), num(ARGV[k + 2])
      local t, tr, d, dr = value(vals, j)
      if not t then t, tr, d, dr = 0, 0, 0, 0 end
      if tl < -1 or dl < -1 then
        local gt, rt, gd, rd = hash_get(KEYS[w], '~' .. ARGV[first + j - 1])
        if not gt then gt, rt, gd, rd = 0, 0, 0, 0 end
        if tl < -1 then t, tl = t - (gt - rt), 0 end
        if dl < -1 then d, dl = d - (gd - rd), 0 end
      end
      seen[ns + 1], seen[ns + 2], seen[ns + 3], seen[ns + 4], seen[ns + 5] = base + j - 1, t, tr, d, dr
      ns = ns + 5
      if not over and ((tl >= 0 and t + tr + tokens > tl) or (dl >= 0 and d + dr + usd > dl)) then
        if not force then
          if redis.call('EXISTS', KEYS[1]) == 1 then return DUPLICATE end   -- a retry, once admitted
          return {0, base + j - 1, t, tr, d, dr, {}}
        end
        over = {base + j - 1, t, tr, d, dr}
      end
    end
    base = base + n
    a = l + 1 + 3 * num(ARGV[l])
  end

  -- The record is the first write, NX: if this id already reserved, nothing has been written yet.
  if not redis.call('SET', KEYS[1], 'r ' .. ARGV[4] .. ' ' .. ARGV[2] .. ' ' .. ARGV[3] .. '\n' .. ARGV[7] ..
                    '\n' .. table.concat(KEYS, ' ', 3) .. '\n' .. ARGV[8], 'NX', 'PXAT', ARGV[5]) then
    return DUPLICATE
  end
  a = 9
  for w = 3, #KEYS do
    local n = num(ARGV[a + 1])
    local first, vals, key = a + 2, reads[w], KEYS[w]
    for j = 1, n do
      local t, tr, d, dr = value(vals, j)
      if not t then t, tr, d, dr = 0, 0, 0, 0 end
      hash_set(key, ARGV[first + j - 1], t, tr + tokens, d, dr + usd)
    end
    hash_commit(key)
    if fresh[w] then hash_expire(key, ARGV[a]) end
    local l = first + n
    a = l + 1 + 3 * num(ARGV[l])
  end
  lease_add(KEYS[2], ARGV[4], ARGV[1])

  if over then
    return {3, over[1], over[2], over[3], over[4], over[5], seen}
  end
  return {1, -1, 0, 0, 0, 0, seen}
end

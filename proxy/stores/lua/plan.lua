-- A request's plan: its window keys and counters, read once from the script's arguments.
--
-- Assembled before the bodies in both forms (proxy/stores/redis.py): the single scripts read the
-- plan of their one call; batch.lua reads it once per batch for all the calls of one plan (they
-- share the window keys and every argument after their own, sent once, see batch.lua), so the
-- per-call work is only the call's own: ids, amounts, the record, the log entry.
-- A plan holds positions into the arguments (A, the script's ARGV), never copies of them.
-- Numbers are read from argument text with `s + 0`, not tonumber(s): Lua 5.1's tonumber parses
-- the text twice (lua_isnumber, then lua_tonumber), each a strtod: about 1,100 instructions
-- against 500 (callgrind), and the scripts read about 14 numbers a request. Both raise on
-- text that is not a number (`+ 0` at once, tonumber's nil at its first use).
--
--   plan.A        the arguments table           plan.keys[w]  window hash w's key (w = 1..nw)
--   plan.exp[w]   A index of its expiry (epoch ms)           plan.n[w]  its number of fields
--   plan.first[w] A index of its first field (a scope field "<type>:<id>", see reserve.lua)
--   plan.rec      A index of the record's counter text (the settle arguments, space-joined)
--   plan.lim[w]   reserve only: {j, token limit, micro-USD limit, ...} as numbers, j = 1..n
--   plan.reply    reserve only: reserve's reply when admitted, with zeros (the status, and 2
--                 per unit each limited counter limits), unpacked into a table sized at once
--   plan.fresh, plan.reads  scratch for the body running now (its window hashes' new-ness and
--                 values between its reads and its writes): calls run one after the other, so
--                 the calls of one plan reuse them instead of making two tables each

local function plan_of(K, q, nw, A, p, limits)
  local keys, exp, n, first, lim = {}, {}, {}, {}, nil
  local plan = {A = A, keys = keys, exp = exp, n = n, first = first, rec = p, nw = nw, fresh = {}, reads = {}}
  if limits then lim = {}; plan.lim = lim end
  local a, limited = p + 1, 0
  for w = 1, nw do
    keys[w] = K[q + w - 1]
    local c = A[a + 1] + 0
    exp[w], n[w], first[w] = a, c, a + 2
    a = a + 2 + c
    if limits then
      local m, l = A[a] + 0, {}
      for x = 1, 3 * m do l[x] = A[a + x] + 0 end
      lim[w] = l
      for x = 2, 3 * m, 3 do                -- 2 reply values for each unit it limits
        if l[x] ~= -1 then limited = limited + 1 end
        if l[x + 1] ~= -1 then limited = limited + 1 end
      end
      a = a + 1 + 3 * m
    end
  end
  if limits then
    local reply = {1}
    for x = 2, 1 + 2 * limited do reply[x] = 0 end
    plan.reply = reply
  end
  return plan
end

-- reserve.lua's plan: KEYS[q .. q + nw - 1] the window hashes; A[p] the record's counters, then
-- per window <expire-at> <n> <n fields> <m> <m x (position, token limit, micro-USD limit)>.
local function reserve_plan(K, q, nw, A, p)
  return plan_of(K, q, nw, A, p, true)
end

-- settle.lua's plan: KEYS[q .. q + nw - 1]; A[p] the record's counters (for the log), then per
-- window <expire-at> <n> <n fields>.
local function settle_plan(K, q, nw, A, p)
  return plan_of(K, q, nw, A, p, false)
end

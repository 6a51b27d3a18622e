-- Run several reserve and settle calls as one script call, in order, atomically.
--
-- Assembled once at start-up (proxy/stores/redis.py): cached.lua (the helpers over a per-batch
-- cache, and flush), plan.lua, reserve.lua, settle.lua (the same bodies the single calls run),
-- then this.
-- Under load the Redis store's coalescer sends the calls that waited while others were out as
-- one batch: one EVALSHA instead of N, each window hash read once (HMGET) and written once
-- (HSET) per batch instead of once per call, one ZADD and one ZREM for the lease index.
--
-- KEYS: the sub-calls' KEYS, one after the other: all of them for a sub-call that carries its
--       plan; only its own (record, leases, and for settle the log) for one that names another's.
-- ARGV: per sub-call, in order: kind ("r" reserve.lua, "s" settle.lua), nk its number of keys
--       here, o its number of own arguments, t, then its own arguments (its ARGV[1..o]); t >= 0:
--       t more arguments follow (the rest of its ARGV) and its plan (plan.lua: its window keys,
--       the rest of its ARGV) is read from them; t < 0: its plan is that of sub-call -t (same
--       kind: calls of one plan share their window keys and everything after their own
--       arguments: the record's counters, the limits, the expiries), sent and read once a batch.
-- Returns one reply per sub-call, in order: what the single call returns, or an error reply.
--
-- Each sub-call sees exactly what it would see run alone after the ones before it (the cache
-- holds their writes), so its reply and effects are those of the single call in that order.
-- A sub-call that raises (a key of the wrong type, out of memory at the first write, bad
-- arguments) is caught (pcall): its reply is the error, and what it did is what the single call
-- would have done before failing: the bodies send every command that can fail (reads, the
-- record, the log) before their first helper write, so it left nothing in the cache and the
-- other sub-calls run on. The writes are sent once every sub-call has run (flush, cached.lua).

local results, plans, k, a, i, nargs = {}, {}, 1, 1, 0, #ARGV

-- The sub-calls' headers repeat the same few numbers (2, 7, -1, ...): each text is parsed once a
-- batch and then looked up (a table read, where `s + 0` is a strtod).
local numbers = {}
local function number(s)
  local v = s + 0
  numbers[s] = v
  return v
end

-- One sub-call: its plan read from the arguments it carries (kept for the later calls naming it)
-- or the one it names; then its body. Inside pcall, so a bad plan fails only its calls.
local function run(kind, nk, own, tail, k, a, i)
  local body, plan = reserve, nil
  if kind ~= 'r' then body = settle end
  if tail >= 0 then
    local mine = kind == 'r' and 2 or 3              -- its own keys: record, leases (, log)
    plan = (kind == 'r' and reserve_plan or settle_plan)(KEYS, k + mine, nk - mine, ARGV, a + own)
    plans[i] = plan
  else
    plan = plans[-tail]
    if not plan then error('the call carrying its plan had bad arguments') end
  end
  return body(KEYS, k, ARGV, a, plan)
end

while a <= nargs do
  local kind, nk, own, tail = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  nk, own, tail = numbers[nk] or number(nk), numbers[own] or number(own), numbers[tail] or number(tail)
  i = i + 1
  local ok, res = pcall(run, kind, nk, own, tail, k, a + 4, i)
  if ok then
    results[i] = res
  else                               -- redis.call raises {err = ...}; Lua itself, a string
    results[i] = redis.error_reply(type(res) == 'table' and res.err or tostring(res))
  end
  a = a + 4 + own
  if tail > 0 then a = a + tail end
  k = k + nk
end
flush()
return results

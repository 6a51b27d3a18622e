-- Run several reserve and settle calls as one script call, in order, atomically.
--
-- Assembled once at start-up (proxy/stores/redis.py): cached.lua (the helpers over a per-batch
-- cache, and flush), reserve.lua, settle.lua (the same bodies the single calls run), then this.
-- Under load the Redis store's coalescer sends the calls that waited while others were out as
-- one batch: one EVALSHA instead of N, each window hash read once (HMGET) and written once
-- (HSET) per batch instead of once per call, one ZADD and one ZREM for the lease index.
--
-- KEYS: the sub-calls' KEYS, one after the other.
-- ARGV: per sub-call, in order: kind ("r" reserve.lua, "s" settle.lua), its number of keys, o its
--       number of own arguments, t, then its own arguments (its ARGV[1..o]); t >= 0: t more
--       arguments follow (the rest of its ARGV); t < 0: the rest of its ARGV is that of sub-call
--       -t (same kind: calls of one plan share everything after their own arguments: the
--       record's counters, the limits, the expiries), sent once a batch.
-- Returns one reply per sub-call, in order: what the single call returns, or an error reply.
--
-- Each sub-call sees exactly what it would see run alone after the ones before it (the cache
-- holds their writes), so its reply and effects are those of the single call in that order.
-- A sub-call that raises (a key of the wrong type, out of memory at the first write, bad
-- arguments) is caught (pcall): its reply is the error, and what it did is what the single call
-- would have done before failing: the bodies send every command that can fail (reads, the
-- record, the log) before their first helper write, so it left nothing in the cache and the
-- other sub-calls run on. The writes are sent once every sub-call has run (flush, cached.lua).

local results, sent, k, a, i = {}, {}, 1, 1, 0
while a <= #ARGV do
  local kind, nk, own, tail = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local args
  a = a + 4
  i = i + 1
  if tail >= 0 then
    args = {unpack(ARGV, a, a + own + tail - 1)}
    sent[i] = args
    a = a + own + tail
  else
    args = {unpack(sent[-tail])}       -- sized at once; its own arguments overwritten below
    for x = 1, own do args[x] = ARGV[a + x - 1] end
    a = a + own
  end
  local ok, res = pcall(kind == 'r' and reserve or settle, {unpack(KEYS, k, k + nk - 1)}, args)
  if ok then
    results[i] = res
  else                               -- redis.call raises {err = ...}; Lua itself, a string
    results[i] = redis.error_reply(type(res) == 'table' and res.err or tostring(res))
  end
  k = k + nk
end
flush()
return results

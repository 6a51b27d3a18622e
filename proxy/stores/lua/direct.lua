-- Store access for a single call: reserve.lua or settle.lua run alone, one EVALSHA per call.
--
-- The two scripts are assembled once at start-up (proxy/stores/redis.py): this file, plan.lua,
-- then the body (reserve.lua or settle.lua, which define `reserve(K, k, A, a, plan)` /
-- `settle(...)`), then the call of the body on this call's plan. The bodies touch window hashes
-- and the lease index only through these helpers; batch.lua runs the same bodies
-- over cache-backed ones (cached.lua). Here each helper is the one Redis command it names;
-- values are packed and unpacked here (struct "<dddd", see reserve.lua): the bodies see numbers.

local unpack, sunpack, spack = unpack, struct.unpack, struct.pack

-- Window hash w of the plan (plan.lua): its marker "_" and its fields (one HMGET); fresh (no
-- marker: the hash is new) and its values: field name -> {tokens used, tokens reserved, micro-USD
-- used, micro-USD reserved}, absent if the field is. The body changes these tables in place (or
-- adds one) and hands them back to hash_write.
local function hash_read(plan, w, _)
  local first, A = plan.first[w], plan.A
  local got = redis.call('HMGET', plan.keys[w], '_', unpack(A, first, first + plan.n[w] - 1))
  local vals = {}
  for i = 2, #got do
    local raw = got[i]
    if raw then vals[A[first + i - 2]] = {sunpack('<dddd', raw)} end
  end
  return not got[1], vals
end

-- One field's value: its four numbers, nil if absent.
local function hash_get(key, field)
  local v = redis.call('HGET', key, field)
  if v then return sunpack('<dddd', v) end
end

-- Write back the fields A[first .. last] that have a value in vals (what hash_read gave, changed
-- in place by the body), with the marker: ONE HSET.
-- The marker's value (WINDOW_MARKER, proxy/keys.py) is longer than a listpack value may be: it keeps
-- the hash a hashtable, where HMGET and HSET find each field by a dict look-up, not a scan.
local hset_args = {'_', WINDOW_MARKER}   -- reused: one call writes its hashes one after another
local function hash_write(key, vals, A, first, last)
  local args, n = hset_args, 2
  for i = first, last do
    local f = A[i]
    local x = vals[f]
    if x then
      args[n + 1], args[n + 2] = f, spack('<dddd', x[1], x[2], x[3], x[4])
      n = n + 2
    end
  end
  redis.call('HSET', key, unpack(args, 1, n))
end

local function hash_expire(key, at)
  redis.call('PEXPIREAT', key, at)
end

-- A single call writes its counters at once (cached.lua defers a batch's settles).
local function settle_later()
  return false
end

-- With the index's anchor member (never due; LEASE_ANCHOR, proxy/keys.py): it keeps the index a
-- skiplist, where adds and removes do not scan the set.
local function lease_add(key, deadline, id)
  redis.call('ZADD', key, '+inf', LEASE_ANCHOR, deadline, id)
end

local function lease_remove(key, id)
  redis.call('ZREM', key, id)
end

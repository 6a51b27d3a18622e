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
-- marker: the hash is new) and what value(vals, j, field) reads field j from: the HMGET reply.
local function hash_read(plan, w)
  local first = plan.first[w]
  local got = redis.call('HMGET', plan.keys[w], '_', unpack(plan.A, first, first + plan.n[w] - 1))
  return not got[1], got
end

-- Field j's value (named `field`; here the reply's position is enough): tokens used, tokens
-- reserved, micro-USD used, micro-USD reserved; nil if absent.
local function value(vals, j, field)
  local v = vals[j + 1]
  if v then return sunpack('<dddd', v) end
end

-- One field's value, as value() gives it.
local function hash_get(key, field)
  local v = redis.call('HGET', key, field)
  if v then return sunpack('<dddd', v) end
end

-- Writing a hash: hash_set for each field, then hash_commit sends them, with the marker, as ONE
-- HSET (a body finishes one hash before it writes the next).
local hset_args, hset_n = {'_', '1'}, 2
local function hash_set(key, field, t, tr, d, dr)
  hset_args[hset_n + 1], hset_args[hset_n + 2] = field, spack('<dddd', t, tr, d, dr)
  hset_n = hset_n + 2
end

local function hash_commit(key)
  redis.call('HSET', key, unpack(hset_args, 1, hset_n))
  hset_n = 2
end

local function hash_expire(key, at)
  redis.call('PEXPIREAT', key, at)
end

local function lease_add(key, deadline, id)
  redis.call('ZADD', key, deadline, id)
end

local function lease_remove(key, id)
  redis.call('ZREM', key, id)
end

-- Store access for a single call: reserve.lua or settle.lua run alone, one EVALSHA per call.
--
-- The two scripts are assembled once at start-up (proxy/stores/redis.py): this file, then the
-- body (reserve.lua or settle.lua, which define `reserve(KEYS, ARGV)` / `settle(KEYS, ARGV)`),
-- then `return reserve(KEYS, ARGV)`. The bodies touch window hashes and the lease index only
-- through these six helpers; batch.lua runs the same bodies over cache-backed ones (cached.lua).
-- Here each helper is the one Redis command it names.

local unpack = unpack

-- HMGET key "_" A[first .. first + n - 1]: {marker, value 1, ..., value n} (false where absent)
local function hash_read(key, A, first, n)
  return redis.call('HMGET', key, '_', unpack(A, first, first + n - 1))
end

local function hash_get(key, field)
  return redis.call('HGET', key, field)
end

-- args: field, value, field, value, ... (always starting with the marker "_", "1")
local function hash_write(key, args)
  redis.call('HSET', key, unpack(args))
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

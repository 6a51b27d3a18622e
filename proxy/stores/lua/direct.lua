-- Store access for a single call: reserve.lua or settle.lua run alone, one EVALSHA per call.
--
-- The two scripts are assembled once at start-up (proxy/stores/redis.py): this file, then the
-- body (reserve.lua or settle.lua, which define `reserve(KEYS, ARGV)` / `settle(KEYS, ARGV)`),
-- then `return reserve(KEYS, ARGV)`. The bodies touch window hashes and the lease index only
-- through these six helpers (and read numeric arguments with num); batch.lua runs the same bodies over cache-backed ones (cached.lua).
-- Here each helper is the one Redis command it names; values are packed and unpacked here
-- (struct "<dddd", see reserve.lua), so the bodies work on numbers.

local unpack, sunpack, spack = unpack, struct.unpack, struct.pack
local num = tonumber                   -- an argument as a number (a batch remembers them, cached.lua)

-- The hash's marker "_" and fields A[first .. first + n - 1]: fresh (no marker: the hash is new),
-- and per field its value {tokens used, tokens reserved, micro-USD used, micro-USD reserved}, or
-- false where absent. One HMGET.
local function hash_read(key, A, first, n)
  local got = redis.call('HMGET', key, '_', unpack(A, first, first + n - 1))
  local vals = {}
  for j = 1, n do
    local v = got[j + 1]
    vals[j] = v and {sunpack('<dddd', v)} or false
  end
  return not got[1], vals
end

local function hash_get(key, field)
  local v = redis.call('HGET', key, field)
  return v and {sunpack('<dddd', v)} or false
end

-- list: field, tokens used, tokens reserved, micro-USD used, micro-USD reserved, field, ...;
-- written with the marker. One HSET.
local function hash_write(key, list)
  local args, n = {'_', '1'}, 2
  for i = 1, #list, 5 do
    args[n + 1], args[n + 2] = list[i], spack('<dddd', list[i + 1], list[i + 2], list[i + 3], list[i + 4])
    n = n + 2
  end
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

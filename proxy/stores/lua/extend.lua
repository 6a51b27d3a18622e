-- Push the lease deadline of an open reservation (long streams).
--
-- KEYS[1] reservation record (string, see reserve.lua)    KEYS[2] lease index (zset)
-- ARGV[1] reservation id    ARGV[2] new deadline (epoch ms)    ARGV[3] record expiry (epoch ms)
-- Returns 1 if extended, 0 if the reservation is settled or unknown.

local rec = redis.call('GET', KEYS[1])
if not rec then return 0 end
local rest = string.match(rec, '^r %d+(.*)$')
if not rest then return 0 end
redis.call('SET', KEYS[1], 'r ' .. ARGV[2] .. rest, 'PXAT', ARGV[3])
redis.call('ZADD', KEYS[2], '+inf', LEASE_ANCHOR, ARGV[2], ARGV[1])   -- the anchor: see direct.lua
return 1

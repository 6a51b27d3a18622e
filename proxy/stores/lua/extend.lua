-- Push the lease deadline of an open reservation (long streams).
--
-- KEYS[1] reservation record (hash)    KEYS[2] lease index (zset)
-- ARGV[1] reservation id    ARGV[2] new deadline (epoch ms)    ARGV[3] record expiry (epoch ms)
-- Returns 1 if extended, 0 if the reservation is settled or unknown.

if redis.call('HGET', KEYS[1], 's') ~= 'r' then return 0 end
redis.call('HSET', KEYS[1], 'dl', ARGV[2])
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1

-- The lender of a scope shared by tenants (global, provider, model) in one window, cluster store:
-- lends chunks of the limit to tenants' allowances (draw) and takes unused ones back (returned).
--
-- KEYS[1] the window's lending hash, in the deployment's own slot ({ns}:a:<window label>):
--           field "<scope field>"          -> "<dddd": lent tokens, lent micro-USD, holders, 0
--           field "<scope field> <tenant>" -> "<dddd": drawn tokens, returned tokens, drawn
--                                             micro-USD, returned micro-USD (cumulative, per tenant)
--           "lent" = what tenants hold or spent = sum over tenants of (drawn - returned).
-- ARGV[1] "draw" or "returned"    ARGV[2] scope field    ARGV[3] tenant (escaped org id)
-- draw:     ARGV[4] token limit  ARGV[5] micro-USD limit (-1 = unlimited: nothing lent)
--           ARGV[6] tokens needed  ARGV[7] micro-USD needed (the tenant's shortfall)
--           ARGV[8] token cap  ARGV[9] micro-USD cap of the extra beyond the need
--           ARGV[10] fraction divisor F    ARGV[11] hash expiry (epoch ms)
--           Returns {1, drawn tokens, drawn micro-USD, lent tokens, lent micro-USD} (cumulative
--           drawn by this tenant, lent after the draw) or {0, drawn tokens, drawn micro-USD,
--           lent tokens, lent micro-USD} when the shortfall does not fit (nothing written; the
--           totals let the tenant credit a chunk it drew but never credited, see allowance.lua).
-- returned: ARGV[4] returned tokens  ARGV[5] returned micro-USD (the tenant's cumulative total)
--           Returns {lent tokens, lent micro-USD} after.
--
-- Units: tokens and micro-USD, integers (doubles, exact below 2^53).
-- Lent never exceeds the limit: a chunk is taken here before any of it can be spent. A draw
-- gives the need plus an extra of min(cap, (free - need) / (F x holders)): a fraction of what
-- is free shared among the tenants holding allowances, shrinking to nothing near the limit.
-- Cumulative per-tenant totals make both calls idempotent under retries when merged with max.

local sunpack, spack, tonumber, floor, max, min = struct.unpack, struct.pack, tonumber, math.floor, math.max, math.min
local key, field, holder = KEYS[1], ARGV[2], ARGV[2] .. ' ' .. ARGV[3]
local got = redis.call('HMGET', key, field, holder)
local lt, ld, holders = 0, 0, 0
if got[1] then lt, ld, holders = sunpack('<ddd', got[1]) end
local dt, rt, dd, rd = 0, 0, 0, 0
if got[2] then dt, rt, dd, rd = sunpack('<dddd', got[2]) end

if ARGV[1] == 'returned' then
  if not got[2] then return {lt, ld} end                  -- the window is gone: nothing to keep
  local nt, nd = max(rt, tonumber(ARGV[4])), max(rd, tonumber(ARGV[5]))
  lt, ld = lt - (nt - rt), ld - (nd - rd)
  redis.call('HSET', key, field, spack('<dddd', lt, ld, holders, 0), holder, spack('<dddd', dt, nt, dd, nd))
  return {lt, ld}
end

local function chunk(limit, lent, need, cap, share)
  if limit < 0 then return 0, true end
  local free = limit - lent
  if need > free then return 0, false end
  return need + min(cap, floor((free - need) / share)), true
end

if not got[2] then holders = holders + 1 end
local share = tonumber(ARGV[10]) * holders
local ct, okt = chunk(tonumber(ARGV[4]), lt, tonumber(ARGV[6]), tonumber(ARGV[8]), share)
local cd, okd = chunk(tonumber(ARGV[5]), ld, tonumber(ARGV[7]), tonumber(ARGV[9]), share)
if not (okt and okd) then return {0, dt, dd, lt, ld} end
lt, ld, dt, dd = lt + ct, ld + cd, dt + ct, dd + cd
local fresh = redis.call('EXISTS', key) == 0
redis.call('HSET', key, field, spack('<dddd', lt, ld, holders, 0), holder, spack('<dddd', dt, rt, dd, rd))
if fresh then redis.call('PEXPIREAT', key, ARGV[11]) end
return {1, dt, dd, lt, ld}

-- A tenant's allowance of a scope shared by tenants, in one window, cluster store: credit what
-- the lender lent it (credit), or give back what it holds unused (give).
--
-- KEYS[1] the tenant's window hash ({ns:<tenant>}:w:<window label>, see reserve.lua):
--           field "<scope field>"  -> the tenant's own spend on the scope ("<dddd" as reserve.lua)
--           field "~<scope field>" -> "<dddd": granted tokens, returned tokens, granted micro-USD,
--                                     returned micro-USD (cumulative); the allowance is granted
--                                     minus returned
-- ARGV[1] "credit" or "give"   ARGV[2] scope field
-- ARGV[3] drawn tokens  ARGV[4] drawn micro-USD: the lender's cumulative total for this tenant
--         (lend.lua); granted becomes at least that, so a credit lost in a crash is made good by
--         the next one, and repeating a credit changes nothing
-- ARGV[5] hash expiry (epoch ms; credit)
-- Returns credit: 1 if the allowance grew, else 0;  give: {returned tokens, returned micro-USD}
--         (cumulative, for lend.lua), then the tokens and micro-USD still reserved on the scope
--         (a later release frees them in the allowance: the caller gives back again later)
--
-- Units: tokens and micro-USD (integers kept as doubles, exact below 2^53). Give returns only
-- what is neither used nor reserved, so spend never exceeds what the lender lent.

local sunpack, spack, tonumber, max = struct.unpack, struct.pack, tonumber, math.max
local key, field = KEYS[1], ARGV[2]
local got = redis.call('HMGET', key, '_', '~' .. field, field)
local gt, rt, gd, rd = 0, 0, 0, 0
if got[2] then gt, rt, gd, rd = sunpack('<dddd', got[2]) end
local grew = tonumber(ARGV[3]) > gt or tonumber(ARGV[4]) > gd
gt, gd = max(gt, tonumber(ARGV[3])), max(gd, tonumber(ARGV[4]))

if ARGV[1] == 'give' then
  if not got[1] then return {rt, rd, 0, 0} end  -- the window's hash is gone: nothing known unused
  local t, tr, d, dr = 0, 0, 0, 0
  if got[3] then t, tr, d, dr = sunpack('<dddd', got[3]) end
  rt, rd = rt + max(0, gt - rt - t - tr), rd + max(0, gd - rd - d - dr)
  redis.call('HSET', key, '~' .. field, spack('<dddd', gt, rt, gd, rd))
  return {rt, rd, tr, dr}
end

redis.call('HSET', key, '_', WINDOW_MARKER, '~' .. field, spack('<dddd', gt, rt, gd, rd))
if not got[1] then redis.call('PEXPIREAT', key, ARGV[5]) end
if grew then return 1 end
return 0

-- Store access for a batch: the helpers of direct.lua, backed by a cache that lives for one
-- batch.lua call (see there for how the batch script is assembled and run).
--
-- Window hashes: each field is read from Redis at most once per batch (one HMGET per hash for
-- the fields not yet cached, the marker "_" included); a sub-call reads what earlier sub-calls
-- wrote; writes stay in the cache and `flush` sends ONE HSET per written hash at the end, then its
-- PEXPIREAT (deferred too: on a hash not yet written it would do nothing). An expiry already in
-- the past deletes the hash at once in the single form (Redis: PEXPIREAT <= now is a DEL), so
-- here it empties the cached hash (later sub-calls find it new, as they would alone) and the
-- flush sends DEL before any later write: the same end state, the same reads.
-- Lease index: ZADD / ZREM are kept per member (the last one wins, nothing in these scripts
-- reads the index) and sent at the end as one ZADD (with the index's anchor, see direct.lua)
-- and one ZREM per lease key.
-- None of these helpers' writes can fail: a sub-call's errors come from the commands it sends
-- itself (reads, the record, the log), before its first helper write (see reserve.lua and
-- settle.lua), so a failed sub-call leaves nothing in the cache.

local unpack, tonumber, sunpack, spack = unpack, tonumber, struct.unpack, struct.pack
local hashes, hash_order = {}, {}      -- key -> {v = field -> value | false, ranges = first -> last
                                       --         (the written fields: A[first .. last]), A = the
                                       --         arguments they index (nil: nothing written),
                                       --         expire = epoch ms | nil, gone = deleted in this batch}
                                       -- values unpacked once when read, packed once when flushed
local leases, lease_order = {}, {}     -- key -> member -> deadline | false (removed)
local now_ms                           -- the server's clock, read once, only if an expiry is set

local function cached(key)
  local h = hashes[key]
  if not h then
    h = {v = {}, ranges = {}}
    hashes[key] = h
    hash_order[#hash_order + 1] = key
  end
  return h
end

-- Fill the cache with the fields A[first .. last] of `key` not cached yet, and the marker "_"
-- the first time: one HMGET, none if all are cached (or the hash was deleted in this batch).
local missing = {}                      -- load's field names, one table for the batch (see flush_args)
local function load(key, h, A, first, last)
  local v, m = h.v, 0
  if v['_'] == nil then
    if h.gone then v['_'] = false else m = 1; missing[1] = '_' end
  end
  for i = first, last do
    local f = A[i]
    if v[f] == nil then
      if h.gone then v[f] = false else m = m + 1; missing[m] = f end
    end
  end
  if m > 0 then
    local got = redis.call('HMGET', key, unpack(missing, 1, m))
    for i = 1, m do
      local f, raw = missing[i], got[i]
      if raw and f ~= '_' then v[f] = {sunpack('<dddd', raw)} else v[f] = raw end
    end
  end
  return v
end

-- Settles added up per plan (settle_later), written by `apply_due` before anything reads the values.
local due_plans, ndue = {}, 0          -- the plans with settles due, in the order of their first

-- Write the settles due, plan by plan, in order (each plan's sums through settle.lua's
-- settle_fields, as its calls would have written them one by one: see settle_later).
local not_fresh = {}                   -- all nil: no hash of a plan with settles due is new
local function apply_due()
  for i = 1, ndue do
    local plan = due_plans[i]
    local sums, reads = plan.due, plan.reads
    due_plans[i], plan.due = nil, nil
    for w = 1, plan.nw do reads[w] = hashes[plan.keys[w]].v end
    plan.settle_fields(plan, not_fresh, reads, sums[1], sums[2], sums[3], sums[4])
  end
  ndue = 0
end

-- A batch's commits and releases change the same fields the same way, call after call: a settle
-- adds used amounts and takes back reserved ones (floored at 0), and reads nothing to decide.
-- So a settle is only added to its plan's sums (four additions instead of a loop over every
-- field), and the sums are written once (apply_due) before any value is read: a reserve's
-- checks, a settle that is not deferred, the flush. The end state is the same as one by one:
-- used amounts only grow (order does not matter), reserved ones only shrink and are floored at
-- 0 (max(0, max(0, x - a) - b) = max(0, x - a - b)), and a field is created by the first call
-- with usage, holding that usage and nothing reserved, as the sums create it. (This holds for
-- the values the scripts write, which are never negative; a used amount made negative by hand
-- would be floored once here and at each call one by one.) Deferred only when
-- every amount is >= 0 (a correction can be negative) and none of the plan's hashes is new, so
-- the writes set no expiry (the first writer's expiry is kept whatever the order); otherwise the
-- sums due are written first and the call writes at once. Returns whether it was deferred.
local function settle_later(plan, fresh, used_t, used_d, res_t, res_d, fields)
  local ok = used_t >= 0 and used_d >= 0 and res_t >= 0 and res_d >= 0
  if ok then
    for w = 1, plan.nw do
      if fresh[w] then ok = false; break end
    end
  end
  if not ok then
    if ndue > 0 then apply_due() end
    return false
  end
  local sums = plan.due
  if sums then
    sums[1], sums[2], sums[3], sums[4] = sums[1] + used_t, sums[2] + used_d, sums[3] + res_t, sums[4] + res_d
  else
    plan.due, plan.settle_fields = {used_t, used_d, res_t, res_d}, fields
    ndue = ndue + 1
    due_plans[ndue] = plan
  end
  return true
end

-- Window hash w of the plan (plan.lua): fresh (no marker "_") and the cache's value table, field
-- name -> {t, tr, d, dr} (false or absent: no such field), which the body changes in place and
-- hands back to hash_write. The plan remembers (loaded) which value table it filled its fields
-- into, so its later calls in the batch skip the check: a table is only replaced when the hash
-- is deleted (hash_expire in the past), and then the plan loads again. The values include the
-- settles due (apply_due) unless `later`: a settle reading before its log entry, which uses
-- them only after settle_later (and then brings them up to date itself).
local function hash_read(plan, w, later)
  if ndue > 0 and not later then apply_due() end
  local key = plan.keys[w]
  local h = hashes[key] or cached(key)
  local v, loaded = h.v, plan.loaded
  if not loaded then
    loaded = {}
    plan.loaded = loaded
  end
  if loaded[w] ~= v then
    local first = plan.first[w]
    load(key, h, plan.A, first, first + plan.n[w] - 1)
    loaded[w] = v
  end
  return not v['_'], v
end

local function hash_get(key, field)
  if ndue > 0 then apply_due() end
  local x = load(key, cached(key), {field}, 1, 1)[field]
  if x then return x[1], x[2], x[3], x[4] end
end

-- The body changed (or added) the value tables of the fields A[first .. last] in vals, the
-- cache's table for key (hash_read). What is written is kept per hash as the plan's range of
-- fields, once per batch, not field by field every call: flush writes every field of the ranges
-- that has a value, and the marker. (A body writes every field of its window that has a value,
-- so the fields of a range with a value are exactly those its calls wrote. All plans' fields are
-- positions in the one ARGV, so `first` names a range.)
local function hash_write(key, vals, A, first, last)
  local h = hashes[key]
  local ranges = h.ranges
  if not ranges[first] then
    ranges[first], h.A = last, A
    h.v['_'] = WINDOW_MARKER
  end
end

local function hash_expire(key, at)
  local h = cached(key)
  if not now_ms then
    local t = redis.call('TIME')
    now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  if tonumber(at) > now_ms then
    h.expire = at
  else                                 -- PEXPIREAT in the past: the hash is deleted now
    h.v, h.ranges, h.A, h.expire, h.gone = {}, {}, nil, nil, true
  end
end

local function lease(key)
  local l = leases[key]
  if not l then
    l = {}
    leases[key] = l
    lease_order[#lease_order + 1] = key
  end
  return l
end

local function lease_add(key, deadline, id)
  lease(key)[id] = deadline
end

local function lease_remove(key, id)
  lease(key)[id] = false
end

-- Send the batch's writes: per hash DEL (if deleted), one HSET, PEXPIREAT; per lease key one
-- ZADD and one ZREM. Hashes first, so that the counters and the log agree even if the lease
-- index (a key of the wrong type: an operator's mistake) refused its write. The HSET arguments
-- go through one table for all hashes (a table grown element by element is rebuilt at every
-- power of two: once a batch, not once a hash).
local flush_args = {'_', WINDOW_MARKER}   -- the marker's value: see direct.lua
local function flush()
  if ndue > 0 then apply_due() end
  for _, key in ipairs(hash_order) do
    local h = hashes[key]
    if h.gone then redis.call('DEL', key) end
    local v, A = h.v, h.A
    if A then                          -- written: the marker, then each field of the ranges once
      local args, n, ranges = flush_args, 2, h.ranges
      local first, last = next(ranges)
      if next(ranges, first) == nil then     -- one range (one plan): a field twice in it (a counter
                                             -- named twice) goes twice, with the same value
        for i = first, last do
          local f = A[i]
          local x = v[f]
          if x then
            args[n + 1], args[n + 2] = f, spack('<dddd', x[1], x[2], x[3], x[4])
            n = n + 2
          end
        end
      else                                   -- plans may share fields (global:*, say): once each
        local done = {}
        for first, last in pairs(ranges) do
          for i = first, last do
            local f = A[i]
            local x = v[f]
            if x and not done[f] then
              done[f] = true
              args[n + 1], args[n + 2] = f, spack('<dddd', x[1], x[2], x[3], x[4])
              n = n + 2
            end
          end
        end
      end
      redis.call('HSET', key, unpack(args, 1, n))
    end
    if h.expire then redis.call('PEXPIREAT', key, h.expire) end
  end
  for _, key in ipairs(lease_order) do            -- ZADD with the anchor first (see direct.lua)
    local add, na, rem, nr = {'+inf', LEASE_ANCHOR}, 2, {}, 0
    for id, deadline in pairs(leases[key]) do
      if deadline then
        add[na + 1], add[na + 2] = deadline, id
        na = na + 2
      else
        nr = nr + 1
        rem[nr] = id
      end
    end
    if na > 2 then redis.call('ZADD', key, unpack(add)) end
    if nr > 0 then redis.call('ZREM', key, unpack(rem)) end
  end
end

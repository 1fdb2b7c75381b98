-- extend.lua: owner-checked lease extension, all locks or none.
-- (Loaded after prelude.lua.)
--
-- KEYS[1..n]  the lock keys
-- KEYS[n+1], KEYS[n+2]  optional: the owner's index, its expiring and its
--             permanent part (see prelude.lua). Only entries it already has
--             are moved or kept alive, so an owner that was not indexed
--             when it acquired (execute's) gets no index.
-- ARGV[1]  n, the number of lock keys
-- ARGV[2]  owner id; "" means anonymous
-- ARGV[3]  new lease in milliseconds, > 0, counted from now
--
-- Returns 0 when every lock was held by the owner and now expires in ARGV[3]
-- ms; otherwise i, the first KEYS[i] not held by the owner, and nothing was
-- changed. A lock taken without expiry gets its lease and moves to the
-- expiring part of the index.

local n = tonumber(ARGV[1])
local owner = ARGV[2]
local ttl = ARGV[3]
local o, p = KEYS[n + 1], KEYS[n + 2]

local values
if n == 1 then
  values = {redis.pcall('GET', KEYS[1])}
else
  values = redis.call('MGET', unpack(KEYS, 1, n))
end
for i = 1, n do
  if not held_by((unflag(values[i])), owner) then
    return i
  end
end
for i = 1, n do
  local lock = KEYS[i]
  local core, flagged, tail = unflag(values[i])
  set_lease(lock, core, flagged, tail, o, p, owner, ttl)
end
if o then
  -- The index outlives its locks: the entries it has follow the new
  -- leases (an unindexed owner's locks have none, and stay out).
  -- (pcall: a key of another type there is not the index, and is left.)
  pcall(index_put, o, {unpack(KEYS, 1, n)}, ttl, true)
end
return 0

-- extend.lua: owner-checked lease extension, all locks or none.
-- (Loaded after prelude.lua.)
--
-- KEYS[1..n]  the lock keys
-- KEYS[n+1]   optional: the owner's index (see acquire.lua); only the
--             entries it already has are updated, so an owner that was not
--             indexed when it acquired (execute's) gets no index
-- ARGV[1]  n, the number of lock keys
-- ARGV[2]  owner id; "" means anonymous
-- ARGV[3]  new lease in milliseconds, > 0, counted from now
--
-- Returns 0 when every lock was held by the owner and now expires in ARGV[3]
-- ms; otherwise i, the first KEYS[i] not held by the owner, and nothing was
-- changed.

local n = tonumber(ARGV[1])
local owner = ARGV[2]
local ttl = tonumber(ARGV[3])
local index = KEYS[n + 1]

for i = 1, n do
  if not held_by(redis.pcall('GET', KEYS[i]), owner) then
    return i
  end
end
local expiry
if index then
  local time = redis.call('TIME')
  expiry = string.format('%.0f', tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000) + ttl)
end
for i = 1, n do
  redis.call('PEXPIRE', KEYS[i], ttl)
  if index then
    redis.call('ZADD', index, 'XX', expiry, KEYS[i])
  end
end
if index then
  index_refresh(index)
end
return 0

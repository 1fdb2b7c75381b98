-- extend.lua: owner-checked lease extension, all locks or none.
--
-- KEYS[1..n]  the lock keys
-- KEYS[n+1]   optional: the owner's index (see acquire.lua)
-- ARGV[1]  n, the number of lock keys
-- ARGV[2]  owner id; "" means anonymous
-- ARGV[3]  new lease in milliseconds, > 0, counted from now
--
-- Returns 0 when every lock was held by the owner and now expires in ARGV[3]
-- ms; otherwise i, the first KEYS[i] not held by the owner, and nothing was
-- changed.

local NONCE_LEN = 12
local n = tonumber(ARGV[1])
local owner = ARGV[2]
local ttl = tonumber(ARGV[3])
local index = KEYS[n + 1]

for i = 1, n do
  local v = redis.pcall('GET', KEYS[i])
  if type(v) ~= 'string' or #v ~= #owner + NONCE_LEN or string.sub(v, 1, #owner) ~= owner then
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
    redis.call('ZADD', index, expiry, KEYS[i])
  end
end
if index then
  -- The index lives as long as its longest lock (see acquire.lua).
  local top = redis.call('ZRANGE', index, -1, -1, 'WITHSCORES')
  if top[2] == 'inf' then
    redis.call('PERSIST', index)
  else
    redis.call('PEXPIREAT', index, top[2])
  end
end
return 0

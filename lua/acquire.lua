-- acquire.lua: take every lock of one request, or none of them.
--
-- KEYS[1..n]      the lock keys, de-duplicated by the caller
-- KEYS[n+1..2n]   the fencing counter of each lock's hash slot (KEYS[n+i] belongs
--                 to KEYS[i]; locks of one slot share a counter, so repeats are fine)
-- KEYS[2n+1]      optional: the owner's index (a sorted set of lock key -> expiry
--                 in ms), passed only for named owners
-- ARGV[1]  n, the number of lock keys
-- ARGV[2]  owner id; "" means anonymous (named owners are never empty)
-- ARGV[3]  nonce: exactly 16 bytes, unique to this call
-- ARGV[4]  lease in milliseconds; "0" means the lock does not expire
--
-- A lock's value is <owner><nonce>. The fixed-length nonce suffix lets the
-- owner be read back without a separator that an owner id could contain, and
-- lets a caller whose reply was lost undo exactly its own acquisition.
--
-- Returns one of:
--   {1, {token_1..token_n}, {reentered_1..reentered_n}}   all locks taken
--   {0, i, pttl}   KEYS[i] is held by someone else; pttl is its remaining
--                  lease in ms (-1: no expiry). Nothing was written.
--   {2, i}         KEYS[i] (or, for i > n, another key of the request) holds a
--                  value of another type. Nothing was written.
--
-- Re-entry: a lock already held by the same named owner is kept with its
-- original nonce; its lease is reset only when ARGV[4] > 0, otherwise the
-- current lease (or none) stays. Anonymous locks are never re-entrant.
--
-- Fencing tokens: every successful call returns, per key, a token strictly
-- greater than any token this slot's counter handed out before: max(last + 1,
-- server time in microseconds). The time floor keeps tokens growing even if
-- the counter is lost (restart without persistence, failover to a replica
-- that had not seen the last increments), as long as the new server's clock
-- is not behind the old one's.

local NONCE_LEN = 16
local n = tonumber(ARGV[1])
local owner = ARGV[2]
local nonce = ARGV[3]
local ttl = tonumber(ARGV[4])
local index = KEYS[2 * n + 1]

-- Phase 1: read and check everything. Redis does not roll a script back on a
-- runtime error, so no write may happen before every check has passed.
local reentered = {}
for i = 1, n do
  local v = redis.pcall('GET', KEYS[i])
  if type(v) == 'table' and v.err then
    return {2, i}
  end
  if v then
    if owner ~= '' and #v == #owner + NONCE_LEN and string.sub(v, 1, #owner) == owner then
      reentered[i] = 1
    else
      return {0, i, redis.call('PTTL', KEYS[i])}
    end
  else
    reentered[i] = 0
  end
end
local last = {}
for i = 1, n do
  local f = KEYS[n + i]
  if last[f] == nil then
    local v = redis.pcall('GET', f)
    if type(v) == 'table' and v.err then
      return {2, n + i}
    end
    last[f] = tonumber(v or '0') or 0
  end
end
if index then
  local t = redis.call('TYPE', index)['ok']
  if t ~= 'zset' and t ~= 'none' then
    return {2, 2 * n + 1}
  end
end

-- Phase 2: write.
local time = redis.call('TIME')
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
local now_ms = math.floor(now_us / 1000)
local tokens = {}
for i = 1, n do
  local key = KEYS[i]
  if reentered[i] == 0 then
    if ttl > 0 then
      redis.call('SET', key, owner .. nonce, 'PX', ttl)
    else
      redis.call('SET', key, owner .. nonce)
    end
  elseif ttl > 0 then
    redis.call('PEXPIRE', key, ttl)
  end
  local f = KEYS[n + i]
  local token = math.max(last[f] + 1, now_us)
  last[f] = token
  -- %.0f prints the integer exactly; tostring would switch to exponent form.
  redis.call('SET', f, string.format('%.0f', token))
  tokens[i] = token
  if index then
    local pttl = redis.call('PTTL', key)
    local score = 'inf'
    if pttl >= 0 then
      score = string.format('%.0f', now_ms + pttl)
    end
    redis.call('ZADD', index, score, key)
  end
end
if index then
  -- Drop entries of locks that expired since, then let the index live exactly
  -- as long as its longest lock, so it cannot outlive what it indexes.
  redis.call('ZREMRANGEBYSCORE', index, '-inf', string.format('%.0f', now_ms))
  local top = redis.call('ZRANGE', index, -1, -1, 'WITHSCORES')
  if top[2] == 'inf' then
    redis.call('PERSIST', index)
  else
    redis.call('PEXPIREAT', index, top[2])
  end
end
return {1, tokens, reentered}

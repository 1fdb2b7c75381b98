-- release.lua: owner-checked release of one or more locks.
--
-- KEYS[1..n]  the lock keys
-- KEYS[n+1]   optional: the owner's index (see acquire.lua)
-- ARGV[1]  n, the number of lock keys
-- ARGV[2]  owner id; "" means anonymous: only anonymous locks are released
-- ARGV[3]  nonce, or "": with a nonce, only the locks taken by that one
--          acquisition are released (used to undo an acquisition whose reply
--          was lost); without, any lock held by the owner is released
--
-- Returns an array of n integers: 1 if KEYS[i] was released, 0 if it was not
-- held by that owner (absent, expired, held by another owner, or not a lock).
-- A key that is not released is left untouched.

local NONCE_LEN = 16
local n = tonumber(ARGV[1])
local owner = ARGV[2]
local nonce = ARGV[3]
local index = KEYS[n + 1]

local result = {}
for i = 1, n do
  local key = KEYS[i]
  local v = redis.pcall('GET', key)
  local mine = false
  if type(v) == 'string' then
    if nonce ~= '' then
      mine = v == owner .. nonce
    else
      mine = #v == #owner + NONCE_LEN and string.sub(v, 1, #owner) == owner
    end
  end
  if mine then
    redis.call('DEL', key)
    if index then
      redis.call('ZREM', index, key)
    end
    result[i] = 1
  else
    result[i] = 0
  end
end
return result

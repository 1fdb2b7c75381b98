-- release_all.lua: release every lock of one owner, or of the whole namespace.
--
-- Owner mode (one key):
--   KEYS[1]  the owner's index (see acquire.lua): the lock keys it may hold
--   ARGV[1]  "owner"
--   ARGV[2]  owner id (never "": anonymous locks are not indexed)
--   Only the indexed keys are visited, never the keyspace; each is deleted if
--   it is still held by the owner. The index is deleted.
--
-- Namespace mode (no keys):
--   ARGV[1]  "namespace"
--   ARGV[2]  the namespace prefix, e.g. "lockstep:"
--   ARGV[3]  a SCAN MATCH pattern for it, with glob characters escaped
--   Every lock and owner index of the namespace is deleted in this one script,
--   so no lock taken meanwhile can survive or be wrongly deleted. Fencing
--   counters are kept, so tokens keep growing after a release_all.
--
-- Returns the number of locks released.

local NONCE_LEN = 16
local released = 0

if ARGV[1] == 'owner' then
  local owner = ARGV[2]
  local index = KEYS[1]
  if redis.call('TYPE', index)['ok'] ~= 'zset' then
    return 0
  end
  for _, key in ipairs(redis.call('ZRANGE', index, 0, -1)) do
    local v = redis.pcall('GET', key)
    if type(v) == 'string' and #v == #owner + NONCE_LEN and string.sub(v, 1, #owner) == owner then
      redis.call('DEL', key)
      released = released + 1
    end
  end
  redis.call('DEL', index)
  return released
end

local prefix = ARGV[2]
local pattern = ARGV[3]
local cursor = '0'
repeat
  local page = redis.call('SCAN', cursor, 'MATCH', pattern, 'COUNT', 1000)
  cursor = page[1]
  for _, key in ipairs(page[2]) do
    -- Layout: <prefix>{<escaped key or owner>}<suffix>. Escaped names never
    -- contain '}', so the first '}' after the prefix ends the hash tag.
    if string.sub(key, #prefix + 1, #prefix + 1) == '{' then
      local close = string.find(key, '}', #prefix + 2, true)
      if close then
        local suffix = string.sub(key, close + 1)
        if suffix == '' then
          redis.call('DEL', key)
          released = released + 1
        elseif suffix == ':o' then
          redis.call('DEL', key)
        end
      end
    end
  end
until cursor == '0'
return released

-- release_all.lua: release every lock of one owner, or of the whole namespace.
-- (Loaded after prelude.lua.)
--
-- Owner mode (one key):
--   KEYS[1]  the owner's index (see acquire.lua): the lock keys it may hold
--   ARGV[1]  "owner"
--   ARGV[2]  owner id (never "": anonymous locks are not indexed)
--   ARGV[3]  how long (ms) a reservation lasts before it lapses unclaimed
--   ARGV[4]  channel prefix (see prelude.lua)
--   Only the indexed keys are visited, never the keyspace; each is deleted if
--   it is still held by the owner, and handed to the next process queued for
--   it. The index is deleted.
--
-- Namespace mode (no keys):
--   ARGV[1]  "namespace"
--   ARGV[2]  the namespace prefix, e.g. "lockstep:"
--   ARGV[3]  a SCAN MATCH pattern for it, with glob characters escaped
--   ARGV[4]  channel prefix
--   Every lock, owner index and wait queue of the namespace is deleted in
--   this one script, so no lock taken meanwhile can survive or be wrongly
--   deleted; every queued process is told, so its waiters try again at once.
--   Fencing counters are kept, so tokens keep growing after a release_all.
--
-- Returns the number of locks released.

local released = 0

if ARGV[1] == 'owner' then
  local owner = ARGV[2]
  local index = KEYS[1]
  if redis.call('TYPE', index)['ok'] ~= 'zset' then
    return 0
  end
  for _, key in ipairs(redis.call('ZRANGE', index, 0, -1)) do
    if held_by(redis.pcall('GET', key), owner) then
      redis.call('DEL', key)
      released = released + 1
      local queue = key .. ':q'
      if redis.call('TYPE', queue)['ok'] == 'list' then
        grant_next(key, queue, ARGV[4], tonumber(ARGV[3]), '')
      end
    end
  end
  redis.call('DEL', index)
  return released
end

local prefix = ARGV[2]
local pattern = ARGV[3]
local channels = ARGV[4]
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
        elseif suffix == ':q' then
          if redis.call('TYPE', key)['ok'] == 'list' then
            local lock = string.sub(key, 1, close)
            for _, e in ipairs(redis.call('LRANGE', key, 0, -1)) do
              local pid = string.sub(e, 1, 1) == '~' and string.sub(e, 2) or e
              redis.call('PUBLISH', channels .. pid, 'w' .. lock)
            end
          end
          redis.call('DEL', key)
        end
      end
    end
  end
until cursor == '0'
return released

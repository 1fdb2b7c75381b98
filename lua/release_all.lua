-- release_all.lua: release every lock of one owner, or of the whole namespace.
-- (Loaded after prelude.lua.)
--
-- Owner mode (two keys):
--   KEYS[1], KEYS[2]  the owner's index, its expiring and its permanent part
--            (see prelude.lua): the lock keys it may hold
--   ARGV[1]  "owner"
--   ARGV[2]  owner id (never "": anonymous locks are not indexed)
--   ARGV[3]  how long (ms) a reservation lasts before it lapses unclaimed
--   ARGV[4]  channel prefix (see prelude.lua)
--   Only the indexed keys are visited, never the keyspace; each is deleted if
--   it is still held by the owner, and handed to the next process queued for
--   it. Both parts of the index are deleted.
--
-- Slots mode (no keys; Redis Cluster, run on every master, with the
-- allow-cross-slot-keys flag): an owner's index is split by hash slot there
-- (<index prefix><slot tag><index suffix>, see src/redis/cluster/slots.rs),
-- each with its two parts: the suffix names the expiring part, and the
-- permanent one has ":p:" where it has ":o:".
--   ARGV[1]  "slots"
--   ARGV[2..3] as in owner mode
--   ARGV[4]  "1": queued processes are told on <ARGV[5]><slot tag>}c:<pid>
--            (sharded channels, see prelude.lua); "": not at all
--   ARGV[5]  index prefix, e.g. "lockstep:{"
--   ARGV[6]  index suffix, e.g. "}:o:run-1"
--   ARGV[7..] the tags of the hash slots this master serves
--   Each index is handled as in owner mode. A slot served elsewhere (moved
--   since the caller looked) is skipped and returned.
--
-- Namespace mode (no keys):
--   ARGV[1]  "namespace"
--   ARGV[2]  the namespace prefix, e.g. "lockstep:"
--   ARGV[3]  a SCAN MATCH pattern for it, with glob characters escaped
--   ARGV[4]  channel prefix ("": queued processes are not told; they find
--            out at their next attempt)
--   Every lock, owner index and wait queue of the namespace is deleted in
--   this one script, so no lock taken meanwhile can survive or be wrongly
--   deleted (on a cluster: on this master); every queued process is told, so its waiters try again at once.
--   Fencing counters are kept, so tokens keep growing after a release_all.
--
-- Returns the number of locks released; in slots mode {released, {tags of
-- the slots skipped}}.

local released = 0

-- Releases the locks in owner index `index` still held by `owner`, handing
-- each to the next process queued for it (told on <channels><pid>), and
-- deletes the index.
local function release_indexed(index, owner, channels)
  if redis.pcall('TYPE', index)['ok'] ~= 'zset' then
    return
  end
  for _, key in ipairs(redis.call('ZRANGE', index, 0, -1)) do
    local core, flagged = unflag(redis.pcall('GET', key))
    if held_by(core, owner) then
      redis.call('DEL', key)
      released = released + 1
      -- pcall (in grant_next): in slots mode during a slot migration the
      -- queue may have moved already (an error here, not a reason to stop).
      if flagged then
        grant_next(key, key .. ':q', channels, tonumber(ARGV[3]))
      end
    end
  end
  redis.call('DEL', index)
end

if ARGV[1] == 'owner' then
  release_indexed(KEYS[1], ARGV[2], ARGV[4])
  release_indexed(KEYS[2], ARGV[2], ARGV[4])
  return released
end

if ARGV[1] == 'slots' then
  local skipped = {}
  local permanent_suffix = string.gsub(ARGV[6], '^}:o:', '}:p:')
  for i = 7, #ARGV do
    local index = ARGV[5] .. ARGV[i] .. ARGV[6]
    local t = redis.pcall('TYPE', index)
    if t['err'] then
      -- A key of a slot another master serves now.
      skipped[#skipped + 1] = ARGV[i]
    else
      local channels = ARGV[4] == '1' and (ARGV[5] .. ARGV[i] .. '}c:') or ''
      release_indexed(index, ARGV[2], channels)
      release_indexed(ARGV[5] .. ARGV[i] .. permanent_suffix, ARGV[2], channels)
    end
  end
  return {released, skipped}
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
          -- A reservation ("\0" .. pid) is cleared but was nobody's lock.
          local v = redis.pcall('GET', key)
          if type(v) ~= 'string' or string.sub(v, 1, 1) ~= '\0' then
            released = released + 1
          end
          redis.call('DEL', key)
        elseif suffix == ':o' or suffix == ':p' or string.sub(suffix, 1, 3) == ':o:'
          or string.sub(suffix, 1, 3) == ':p:' then
          redis.call('DEL', key)
        elseif suffix == ':q' then
          if redis.call('TYPE', key)['ok'] == 'list' then
            local lock = string.sub(key, 1, close)
            for _, e in ipairs(redis.call('LRANGE', key, 0, -1)) do
              local pid = string.sub(e, 1, 1) == '~' and string.sub(e, 2) or e
              if channels ~= '' then
                tell(channels .. pid, 'w' .. lock)
              end
            end
          end
          redis.call('DEL', key)
        end
      end
    end
  end
until cursor == '0'
return released

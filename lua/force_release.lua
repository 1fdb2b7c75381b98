-- force_release.lua: an operator frees a lock whoever holds it, and its
-- waiters are served as after a release. (Loaded after prelude.lua.)
--
-- KEYS[1]  the lock key
-- KEYS[2]  its wait queue
-- ARGV[1]  how long (ms) a reservation lasts before it lapses unclaimed
-- ARGV[2]  channel prefix (see prelude.lua)
--
-- Returns {now, lock} as inspect.lua does, describing the lock as it was:
-- when it was held (status 1) it is now free, and the next process queued
-- for it has been served; otherwise nothing changed (a reservation is a
-- hand-over in flight, not a holder, and lapses by itself). The old
-- holder's next extend finds no lock of its own, and the next holder's
-- token comes from the same counter, so it is higher. Entries of the old
-- holder's index are left: release_all checks each entry's holder.

local lock, queue = KEYS[1], KEYS[2]
local before, v = describe(lock, queue)
if before[1] == 1 then
  redis.call('DEL', lock)
  local _, flagged = unflag(v)
  if flagged then
    grant_next(lock, queue, ARGV[2], ARGV[1])
  end
end
return {now_ms(), before}

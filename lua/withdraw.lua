-- withdraw.lua: a process stops waiting for a lock. (Loaded after prelude.lua.)
--
-- KEYS[1]  the lock key
-- KEYS[2]  its wait queue
-- ARGV[1]  the process's queue entry to remove ("<pid>" or "~<pid>")
-- ARGV[2]  the process's pid
-- ARGV[3]  how long (ms) a reservation lasts before it lapses unclaimed
-- ARGV[4]  channel prefix (see prelude.lua)
--
-- Removes the entry. If the lock is reserved for that process, which no
-- longer wants it, the reservation passes to the next process queued.
-- Returns 1.

local lock, queue = KEYS[1], KEYS[2]
-- pcall, not a TYPE first: a queue key of another type is left alone (and
-- grant_next skips it the same way).
redis.pcall('LREM', queue, 0, ARGV[1])
if ARGV[2] ~= '' and redis.pcall('GET', lock) == '\0' .. ARGV[2] then
  redis.call('DEL', lock)
  grant_next(lock, queue, ARGV[4], tonumber(ARGV[3]))
end
return 1

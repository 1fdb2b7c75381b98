-- inspect.lua: what each lock looks like, for `inspect` and `lockstep
-- locks`. Reads only. (Loaded after prelude.lua, whose value format it
-- reads.)
--
-- KEYS[1..n]      the lock keys (one hash slot on a cluster)
-- KEYS[n+1..2n]   their wait queues (<lock key>:q)
-- ARGV[1]         n, the number of lock keys
--
-- Returns {now, lock_1, ..., lock_n}: now is the server's clock in ms, and
-- each lock is described as prelude.lua's `describe` says.

local n = tonumber(ARGV[1])
local result = {now_ms()}
for i = 1, n do
  result[i + 1] = (describe(KEYS[i], KEYS[n + i]))
end
return result

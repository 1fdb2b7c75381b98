-- acquire.lua: take every lock of one request, or none of them.
-- (Loaded after prelude.lua, whose helpers it uses.)
--
-- KEYS[1..n]      the lock keys, de-duplicated by the caller
-- KEYS[n+1..2n]   the fencing counter of each lock's hash slot (KEYS[n+i] belongs
--                 to KEYS[i]; locks of one slot share a counter, so repeats are fine)
-- KEYS[2n+1..3n]  the wait queue of each lock (<lock key>:q)
-- KEYS[3n+1]      optional: the owner's index (a sorted set of lock key -> expiry
--                 in ms), passed only for named owners
-- ARGV[1]   n, the number of lock keys
-- ARGV[2]   owner id; "" means anonymous (named owners are never empty)
-- ARGV[3]   nonce: exactly 12 bytes, unique to this acquisition
-- ARGV[4]   lease in milliseconds; "0" means the lock does not expire
-- ARGV[5]   pid of the calling process, or "" if it takes no notifications
-- ARGV[6]   queue entry to add to the first held lock's queue on conflict:
--           "<pid>" (wait for a handoff), "~<pid>" (wait to be woken), or ""
-- ARGV[7]   "1": fair: a free lock with processes queued for a handoff is
--           reserved for the first of them instead of taken; "0": barge
-- ARGV[8]   how long (ms) a queue touched by this call must live at least
-- ARGV[9]   how long (ms) a reservation lasts before it lapses unclaimed
-- ARGV[10]  channel prefix: process pid is told on <prefix><pid>
-- ARGV[11]  "1": the caller has more waiters for these locks: keep its
--           handoff entry queued after taking them
-- ARGV[12]  optional, "1": leave the lease of re-entered locks as it is (a
--           Redis Cluster request over several slots: another slot may still
--           refuse, and the give-back by nonce does not touch re-entered
--           locks; the caller extends them once every slot said yes)
--
-- Returns one of:
--   {1, {token_1..token_n}, {reentered_1..reentered_n}}   all locks taken
--   {0, i, pttl}   KEYS[i] is held (or reserved for another process); pttl is
--                  its remaining lease in ms (-1: no expiry). No lock was
--                  taken; the caller's queue entry (ARGV[6]) was added.
--   {2, i}         KEYS[i] (or, for i > n, another key of the request) holds a
--                  value of another type. Nothing was written.
--
-- Re-entry: a lock already held by the same named owner is kept with its
-- original nonce; its lease is reset only when ARGV[4] > 0, otherwise the
-- current lease (or none) stays. Anonymous locks are never re-entrant.
-- A lock reserved for the caller's process counts as free for it (claim),
-- and so does one holding this very acquisition's value (a retry after a
-- lost reply).
--
-- Fencing tokens: every successful call returns, per key, a token strictly
-- greater than any token this slot's counter handed out before: max(last + 1,
-- server time in microseconds). The time floor keeps tokens growing even if
-- the counter is lost (restart without persistence, failover to a replica
-- that had not seen the last increments), as long as the new server's clock
-- is not behind the old one's.

local n = tonumber(ARGV[1])
local owner = ARGV[2]
local nonce = ARGV[3]
local ttl = tonumber(ARGV[4])
local pid = ARGV[5]
local entry = ARGV[6]
local fair = ARGV[7] == '1'
local queue_ttl = tonumber(ARGV[8])
local claim_ms = tonumber(ARGV[9])
local prefix = ARGV[10]
local more = ARGV[11] == '1'
local keep_reentered = ARGV[12] == '1'
local index = KEYS[3 * n + 1]
local reserved_for_me = pid ~= '' and ('\0' .. pid) or nil

-- Phase 1: check everything. Redis does not roll a script back on a runtime
-- error, so the locks are written only once every check has passed; before
-- that only queues and reservations change, which are valid either way.
for i = 2 * n + 1, 3 * n do
  local t = redis.call('TYPE', KEYS[i])['ok']
  if t ~= 'list' and t ~= 'none' then
    return {2, i}
  end
end
for i = n + 1, 2 * n do
  local v = redis.pcall('GET', KEYS[i])
  if type(v) == 'table' and v.err then
    return {2, i}
  end
end
if index then
  local t = redis.call('TYPE', index)['ok']
  if t ~= 'zset' and t ~= 'none' then
    return {2, 3 * n + 1}
  end
end
local reentered = {}
for i = 1, n do
  local lock, queue = KEYS[i], KEYS[2 * n + i]
  local v = redis.pcall('GET', lock)
  if type(v) == 'table' and v.err then
    return {2, i}
  end
  -- Free for us: absent, reserved for our process, or already ours from
  -- an earlier attempt of this same call whose reply was lost (same nonce).
  if not v or v == reserved_for_me or v == owner .. nonce then
    if not v and fair then
      local next = grant_next(lock, queue, prefix, claim_ms, pid)
      if next and next ~= pid then
        -- Another process's turn: it holds the reservation now.
        if entry ~= '' then
          enqueue(queue, entry, queue_ttl, false)
        end
        return {0, i, claim_ms}
      end
    end
    reentered[i] = 0
  elseif owner ~= '' and held_by(v, owner) then
    reentered[i] = 1
  else
    if entry ~= '' then
      enqueue(queue, entry, queue_ttl, false)
    end
    return {0, i, redis.call('PTTL', lock)}
  end
end

-- Phase 2: take the locks.
local now = now_us()
local now_ms = math.floor(now / 1000)
local tokens = {}
for i = 1, n do
  local lock, queue = KEYS[i], KEYS[2 * n + i]
  if reentered[i] == 0 then
    if ttl > 0 then
      redis.call('SET', lock, owner .. nonce, 'PX', ttl)
    else
      redis.call('SET', lock, owner .. nonce)
    end
  elseif ttl > 0 and not keep_reentered then
    redis.call('PEXPIRE', lock, ttl)
  end
  tokens[i] = next_token(KEYS[n + i], now)
  if pid ~= '' then
    local popped = false
    if redis.call('LINDEX', queue, 0) == pid then
      redis.call('LPOP', queue)
      popped = true
    end
    if more then
      -- A process has one handoff entry per queue: popped, it is absent.
      enqueue(queue, pid, queue_ttl, popped)
    end
  end
  if index then
    local left = ttl
    if reentered[i] == 1 and (ttl == 0 or keep_reentered) then
      left = redis.call('PTTL', lock)
      if left < 0 then
        left = 0
      end
    end
    index_add(index, lock, now_ms, left)
  end
end
return {1, tokens, reentered}

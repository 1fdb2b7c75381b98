-- acquire.lua: take every lock of one request, or none of them.
-- (Loaded after prelude.lua, whose helpers it uses.)
--
-- KEYS[1..n]      the lock keys, de-duplicated by the caller
-- KEYS[n+1..2n]   the fencing counter of each lock's hash slot (KEYS[n+i] belongs
--                 to KEYS[i]; locks of one slot share a counter, so repeats are fine)
-- KEYS[2n+1..3n]  the wait queue of each lock (<lock key>:q)
-- KEYS[3n+1..3n+2] optional: the owner's index, its expiring and its permanent
--                 part (named owners whose locks release_all must find)
-- ARGV[1]   n, the number of lock keys
-- ARGV[2]   owner id; "" means anonymous (named owners are never empty)
-- ARGV[3]   nonce: exactly 12 bytes, unique to this acquisition; it starts
--           with '.' exactly when ARGV[4] is "0" (see prelude.lua)
-- ARGV[4]   lease in milliseconds; "0" means the lock does not expire
-- ARGV[5]   pid of the calling process, or "": a lock reserved for that
--           process is free for this call (it claims the reservation)
-- ARGV[6]   queue entry to add to the first held lock's queue on conflict:
--           "<pid>" (wait for a handoff), "~<pid>" (wait to be woken), or ""
-- ARGV[7]   how long (ms) a queue touched by this call must live at least
-- ARGV[8]   "1": the caller has more waiters for these locks: keep its
--           handoff entry queued after taking them
-- ARGV[9]   "1": leave the lease of re-entered locks as it is (a Redis
--           Cluster request over several slots: another slot may still
--           refuse, and the give-back by nonce does not touch re-entered
--           locks; the caller extends them once every slot said yes)
-- ARGV[10]  floor of the fencing tokens in microseconds, or "0": the
--           caller's clock rounded down to 100 ms (a Redlock set passes it
--           exact, so that its masters' tokens agree)
-- ARGV[11]  the holder's metadata for inspection, or "" (at most 255 bytes,
--           no control characters: the caller checks)
--
-- Returns one of:
--   token          (n = 1) the lock, free, was taken with this fencing
--                  token: the fast path's reply, one integer for the
--                  client to parse
--   {1, {token_1..token_n}, {reentered_1..reentered_n}}   all locks taken
--   {0, i, pttl}   KEYS[i] is held (or reserved for another process); pttl is
--                  its remaining lease in ms (-1: no expiry). No lock was
--                  taken; the caller's queue entry (ARGV[6]) was added and
--                  the lock flagged as contended.
--   {2, i}         KEYS[i] (or, for i > n, another key of the request) holds a
--                  value of another type. Nothing was written.
--
-- The fast path, every lock free, is one INCR and one SET NX per lock
-- (EXISTS first for several), and for a named owner its index and one TIME
-- (a lock without expiry also reads the clock: see VIRTUAL in prelude.lua). The
-- token comes first, so that the lock is written once, with its tail (see
-- prelude.lua); a single lock found held has used up a counter value, which
-- costs nothing (tokens only need to grow). A free lock
-- is taken even if processes are still queued for it (its holder's lease ran
-- out, or a reservation lapsed): those waiters wake at that moment anyway
-- and queue again.
--
-- Re-entry: a lock already held by the same named owner is kept with its
-- acquisition time and metadata, and records its new token; its nonce is
-- marked (see shared_core) so that no undo by nonce frees it any more;
-- its lease is reset only when ARGV[4] > 0, otherwise the current lease (or
-- none) stays. Anonymous locks are never re-entrant.
-- A lock reserved for the caller's process counts as free for it (claim),
-- and so does one holding this very acquisition's value (a retry after a
-- lost reply).
--
-- Fencing tokens: every successful call returns, per key, a token strictly
-- greater than any token this slot's counter handed out before (its INCR; a
-- counter behind ARGV[10], or new, jumps to the clock: see next_token).

local n = tonumber(ARGV[1])
local owner = ARGV[2]
local value = owner .. ARGV[3]
-- Numbers go to redis.call as the strings they came as: converting a Lua
-- number back to a string costs a printf per call.
local ttl = ARGV[4]
local leased = ttl ~= '0'
local pid = ARGV[5]
local entry = ARGV[6]
local queue_ttl = ARGV[7]
local more = ARGV[8] == '1'
local keep_reentered = ARGV[9] == '1'
local floor = tonumber(ARGV[10])
local meta = ARGV[11] or ''
local o, p = KEYS[3 * n + 1], KEYS[3 * n + 2]

-- After taking lock i: this process's handoff entry, if it heads the
-- queue, is served; with more local waiters the process queues again at
-- the tail and the lock is flagged. Returns whether the lock needs the flag.
local function after_taking(i)
  local queue = KEYS[2 * n + i]
  local popped = false
  if redis.call('LINDEX', queue, 0) == pid then
    redis.call('LPOP', queue)
    popped = true
  end
  if more then
    enqueue(queue, pid, queue_ttl, popped)
    return true
  end
  return redis.call('LLEN', queue) > 0
end

-- The token of KEYS[1], when the fast path drew it.
local first_token

-- Fast path: every lock free. One lock first, the common case, before the
-- helpers below are even defined (each definition is a closure made on
-- every call), and without their tables.
if n == 1 then
  local counted, token = pcall(next_token, KEYS[2], floor)
  if not counted then
    return foreign(token, {2, 2})
  end
  first_token = token
  local v = value .. tail_of(token, meta, ttl)
  local free
  if leased then
    free = redis.call('SET', KEYS[1], v, 'NX', 'PX', ttl)
  else
    free = redis.call('SET', KEYS[1], v, 'NX')
  end
  if free then
    if more and after_taking(1) then
      redis.call('APPEND', KEYS[1], FLAG)
    end
    if o then
      local indexed_ok, err = pcall(index_add, o, p, {KEYS[1]}, owner, ttl, token)
      if not indexed_ok then
        -- Given back whatever the error: no lock without its index entry.
        redis.call('DEL', KEYS[1])
        return foreign(err, {2, 4})
      end
    end
    return token
  end
end

-- Writes `v` into lock i with this call's lease.
local function set_lock(i, v)
  if leased then
    redis.call('SET', KEYS[i], v, 'PX', ttl)
  else
    redis.call('SET', KEYS[i], v)
  end
end

-- A token per lock, or nil and the index of a counter of another type.
-- Drawn before any lock is written, so a foreign counter leaves nothing to
-- give back.
local function tokens_of()
  if first_token then
    return {first_token}
  end
  local tokens = {}
  for i = 1, n do
    local ok, t = pcall(next_token, KEYS[n + i], floor)
    if not ok then
      return nil, foreign(t, n + i)
    end
    tokens[i] = t
  end
  return tokens
end

-- Indexes the locks this call took (not re-entered ones); a foreign index
-- gives them back. Returns the reply.
local function indexed(reentered, tokens)
  if not o then
    return {1, tokens, reentered}
  end
  local keys = {}
  for i = 1, n do
    if reentered[i] == 0 then
      keys[#keys + 1] = KEYS[i]
    end
  end
  if #keys == 0 then
    return {1, tokens, reentered}
  end
  local ok, err = pcall(index_add, o, p, keys, owner, ttl, tokens[1])
  if ok then
    return {1, tokens, reentered}
  end
  redis.call('DEL', unpack(keys))
  return foreign(err, {2, 3 * n + 1})
end

if n > 1 and redis.call('EXISTS', unpack(KEYS, 1, n)) == 0 then
  local tokens, bad = tokens_of()
  if not tokens then
    return {2, bad}
  end
  local reentered = {}
  for i = 1, n do
    reentered[i] = 0
    local flag = more and after_taking(i)
    set_lock(i, value .. tail_of(tokens[i], meta, ttl) .. (flag and FLAG or ''))
  end
  return indexed(reentered, tokens)
end

-- Slow path. Phase 1: check everything. Redis does not roll a script back
-- on a runtime error, so the locks are written only once every check has
-- passed; before that only queues and contention flags change, which are
-- valid either way.
local how, values = {}, {}
for i = 1, n do
  local lock = KEYS[i]
  local v = redis.pcall('GET', lock)
  if type(v) == 'table' and v.err then
    return {2, i}
  end
  values[i] = v
  local core, flagged = unflag(v)
  if not v then
    how[i] = 'free'
  elseif core == value then
    -- Ours already: an earlier attempt of this call whose reply was lost.
    how[i] = 'own'
  elseif pid ~= '' and v == '\0' .. pid then
    how[i] = 'claim'
  elseif owner ~= '' and held_by(core, owner) then
    how[i] = 'reenter'
  else
    if entry ~= '' then
      -- A queue of another type fails enqueue's first command (the same
      -- check as a TYPE first, without the extra command).
      local queued, err = pcall(enqueue, KEYS[2 * n + i], entry, queue_ttl, false)
      if not queued then
        return foreign(err, {2, 2 * n + i})
      end
      if not flagged and string.byte(v, 1) ~= 0 then
        redis.call('APPEND', lock, FLAG)
      end
    end
    return {0, i, redis.call('PTTL', lock)}
  end
end

-- Phase 2: take the locks, tokens first.
local tokens, bad = tokens_of()
if not tokens then
  return {2, bad}
end
local reentered, renewed = {}, {}
for i = 1, n do
  local lock = KEYS[i]
  reentered[i] = 0
  if how[i] == 'reenter' or how[i] == 'own' then
    -- Ours already: the same value with the new token in its tail.
    reentered[i] = how[i] == 'reenter' and 1 or 0
    local core, flagged, tail = unflag(values[i])
    if how[i] == 'reenter' then
      core = shared_core(core)
    end
    tail = tail == '' and tail_of(tokens[i], meta) or retoken(tail, tokens[i])
    if leased and not (keep_reentered and how[i] == 'reenter') then
      if permanent(core) and how[i] == 'reenter' then
        set_lease(lock, core, flagged, tail, o, p, owner, ttl)
      else
        tail = relet(lock, tail, ttl) or tail
        redis.call('SET', lock, core .. tail .. (flagged and FLAG or ''), 'PX', ttl)
      end
      if how[i] == 'reenter' then
        -- (A lock of this very call, 'own', is indexed below as new.)
        renewed[#renewed + 1] = lock
      end
    else
      redis.call('SET', lock, core .. tail .. (flagged and FLAG or ''), 'KEEPTTL')
    end
  else
    local flag = pid ~= '' and after_taking(i)
    set_lock(i, value .. tail_of(tokens[i], meta, ttl) .. (flag and FLAG or ''))
  end
end
if #renewed > 0 and o then
  -- The index outlives its locks: the entries of the re-entered ones
  -- follow their new leases (a foreign index is reported below, or, when
  -- every lock was the owner's already, left alone).
  pcall(index_put, o, renewed, ttl, true)
end
return indexed(reentered, tokens)

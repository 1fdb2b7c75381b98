-- prelude.lua: helpers shared by the scripts. lockstep prepends this file to
-- every other script for EVALSHA (prelude .. script), and puts it once at
-- the head of its function library, each script a function after it (see
-- src/redis/scripts/mod.rs), so it defines functions only and touches no
-- key. In a library its state outlives a call: the clock reading below is
-- reset as each function starts; the index score's memo may stay.
--
-- Values: a lock holds <owner><12-byte nonce><tail>; an anonymous lock
-- holds the nonce and the tail. <owner><nonce> is the *core*: who holds the
-- lock, and which acquisition took it. A nonce that starts with '.' marks a
-- lock taken without expiry (it is indexed apart; see below). The tail says
-- what `inspect` reports: <metadata><token><acquired><m>'^', where
-- <metadata> is the holder's optional description (0 to 255 bytes, no
-- control characters), <token> the fencing token handed out with the lock
-- (8 bytes, big-endian), <acquired> when it was taken (6 bytes: see
-- VIRTUAL below), <m> the metadata's length (one
-- byte) and '^' a fixed last byte: 16 bytes and the metadata, read from the
-- end, so that no owner id can be mistaken for them. A lock some process
-- waits for carries the *contended* flag, one trailing "\1" byte after the
-- tail (which ends in '^', so the flag is unambiguous): only then does a
-- release look at the queue. A lock *reserved* for a waiting process holds
-- "\0" .. <pid> and no tail (owner ids never contain NUL, so a reservation
-- never looks owned).
--
-- Queues: <lock key>:q is a list of the processes waiting for that lock, at
-- most one entry per process and kind: "<pid>" waits for a handoff (a
-- single-key waiter: the lock is reserved for that process when it is
-- released), "~<pid>" only wants to be woken (multi-key waiters, which then
-- retry). Each process is told through its own channel, <channel prefix><pid>:
-- "r<lock key>" when the lock was reserved for it, "w<lock key>" when it
-- should look again. On a Redis Cluster the channel prefix carries the hash
-- tag of the lock's slot (<namespace>{<slot tag>}c:) and the message goes
-- out by sharded pub/sub (SPUBLISH), which a script may send to a channel
-- of its own slot; a namespace never contains '{', so the tag is the sign.
--
-- Owner indexes: a named owner's locks with a lease are in <owner>:o, a
-- sorted set scored by (about) the end of each lock's lease, that expires
-- with its highest score, so it outlives its locks; those without expiry
-- in <owner>:p, a sorted set without expiry. A release removes a lock from
-- :p only: :o entries of released or expired locks stay until the index
-- expires or is trimmed (release_all checks each entry's holder anyway).

local NONCE_LEN = 12
-- The longest life a waiter asks its queue for, ms (QUEUE_TTL_MAX in
-- src/redis/acquire/wait.rs; a unit test there keeps the two equal).
local QUEUE_LIFE_MAX_MS = 3600000
local FLAG = '\1'
local TAIL_LEN = 16
local TAIL_END = 94 -- '^'

-- The server's clock in microseconds, read once per script call (TIME).
local clock_us
local function now_us()
  if not clock_us then
    local now = redis.call('TIME')
    clock_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
  end
  return clock_us
end

-- The server's clock in milliseconds.
local function now_ms()
  return math.floor(now_us() / 1000)
end

-- The value v split into its core (nil for no value, v itself for a value
-- without a tail: a reservation, or a key of another writer), whether it
-- had the contended flag, and its tail ('' if none).
local function unflag(v)
  if type(v) ~= 'string' then
    return v, false, ''
  end
  local flagged = string.byte(v, -1) == 1
  local len = flagged and #v - 1 or #v
  if len < TAIL_LEN or string.byte(v, len) ~= TAIL_END then
    return (flagged and string.sub(v, 1, -2) or v), flagged, ''
  end
  local core_len = len - TAIL_LEN - string.byte(v, len - 1)
  if core_len < NONCE_LEN then
    return (flagged and string.sub(v, 1, -2) or v), flagged, ''
  end
  return string.sub(v, 1, core_len), flagged, string.sub(v, core_len + 1, len)
end


-- A tail's <acquired> field is one of two things. Below VIRTUAL: the
-- server's clock (ms since the epoch) when the lock was taken. VIRTUAL + d:
-- the lock has a lease, and d is the lease it was last given plus how long
-- it had been held then (ms), so that it was taken at now - (d - PTTL).
-- The second needs no clock to write: an uncontended acquisition with a
-- lease runs no TIME. It must be rewritten whenever the lease changes
-- (relet); the first stays true whatever happens to the lease.
local VIRTUAL = 2 ^ 47

-- The tail of a lock taken now with fencing token `token` by a holder
-- described by `meta` ('' for none; the caller checked it: at most 255
-- bytes, no control characters), with a lease of ttl ms (a decimal
-- string) that it is about to be written with, or nil (no lease, or one
-- left as it is).
local function tail_of(token, meta, ttl)
  local since
  if ttl and ttl ~= '0' then
    since = VIRTUAL + tonumber(ttl)
  else
    since = now_ms()
  end
  return meta .. struct.pack('>I8I6B', token, since, #meta) .. '^'
end

-- The <acquired> field of a (non-empty) tail.
local function since_of(tail)
  local _, since = struct.unpack('>I8I6', tail, #tail - TAIL_LEN + 1)
  return since
end

-- When the lock whose tail is `tail`, with `pttl` ms of lease left (-1:
-- none), was taken: the server's clock in ms.
local function acquired_of(tail, pttl)
  local since = since_of(tail)
  if since < VIRTUAL then
    return since
  end
  -- (Never later than now: a tail left behind by a lease changed without
  -- it, see set_lease.)
  return now_ms() - math.max(since - VIRTUAL - math.max(pttl, 0), 0)
end

-- `tail` with `bytes` in place of its bytes from `from` (1-based, counted
-- from the start of its 16 fixed bytes).
local function patch(tail, from, bytes)
  local at = #tail - TAIL_LEN + from - 1
  return string.sub(tail, 1, at) .. bytes .. string.sub(tail, at + #bytes + 1)
end

-- The (non-empty) `tail` of the held `lock` for the lease of ttl ms (a
-- decimal string, > 0) it is about to be given, or nil when it needs no
-- change (it holds the clock's reading). A VIRTUAL tail keeps its
-- acquisition time to the millisecond (PTTL counts from the time a script
-- starts, TIME from when it is called).
local function relet(lock, tail, ttl)
  local since = since_of(tail)
  if since < VIRTUAL then
    return nil
  end
  local held = math.max(since - VIRTUAL - math.max(redis.call('PTTL', lock), 0), 0)
  return patch(tail, 9, struct.pack('>I6', VIRTUAL + held + tonumber(ttl)))
end

-- `tail` with its token replaced by `token` (a re-entry: the holder's
-- newest token is the one a store has seen), acquisition time and metadata
-- kept.
local function retoken(tail, token)
  return patch(tail, 1, struct.pack('>I8', token))
end

-- Whether the (unflagged) value v is held by owner (anonymous: owner == '').
local function held_by(v, owner)
  return type(v) == 'string' and #v == #owner + NONCE_LEN and string.sub(v, 1, #owner) == owner
end

-- The core of a lock re-entered by its owner: the nonce's second byte
-- becomes '!', which no nonce has. The lock is the re-entering call's too
-- now, so the undo of the acquisition that took it (by its nonce, when its
-- reply was lost) must leave it: no undo matches it any more. The owner
-- still releases it, and the first byte (a lock without expiry) is kept.
local function shared_core(core)
  local at = #core - NONCE_LEN + 2
  return string.sub(core, 1, at - 1) .. '!' .. string.sub(core, at + 1)
end

-- Whether the (unflagged) value v was taken without expiry.
local function permanent(v)
  return string.byte(v, #v - NONCE_LEN + 1) == 46
end

-- Strictly greater than every token counter f gave before: its next value.
-- A counter behind `floor` (the caller's clock in microseconds, coarse, or
-- exact for a Redlock set) jumps to it, and a new one (a fresh server, one
-- restarted without persistence) to at least the server's clock, so tokens
-- keep growing across a lost or stale counter (a promoted replica that
-- missed increments) as long as the clocks are not behind. Ahead of the
-- floor, it is a single INCR.
local function next_token(f, floor)
  local t = redis.call('INCR', f)
  if t == 1 then
    local us = now_us()
    if us > floor then
      floor = us
    end
  end
  if t < floor then
    t = floor
    -- %.0f prints the integer exactly; tostring would switch to exponent form.
    redis.call('SET', f, string.format('%.0f', t))
  end
  return t
end

-- What a script answers when a call under pcall failed with `err`:
-- `reply` (its "a key of another type" answer) when the error is
-- WRONGTYPE; any other error (out of memory, a command the user may not
-- run) is raised again, so that the caller sees it as what it is.
local function foreign(err, reply)
  local msg = type(err) == 'table' and err.err or tostring(err)
  if string.find(msg, 'WRONGTYPE', 1, true) then
    return reply
  end
  error(err)
end

-- Sends `message` to `channel` and returns how many subscribers heard it
-- (on a cluster: those of this shard, where the waiting processes subscribe).
local function tell(channel, message)
  if string.find(channel, '{', 1, true) then
    return redis.call('SPUBLISH', channel, message)
  end
  return redis.call('PUBLISH', channel, message)
end

-- Serves the queue of the free lock `lock`: pops entries from the head,
-- wakes each "~pid" entry, and reserves the lock (for claim_ms) for the
-- first "pid" entry whose process hears the message (PUBLISH counts the
-- receivers: a process that died or lost its subscription hears nothing and
-- is skipped). Returns the pid the lock was reserved for, or nil when the
-- queue ran out. Entries are popped up to 8 at a time, so that a queue of
-- one entry (the common case) costs one LPOP, not a second one that finds
-- it empty; those popped after the entry the lock was reserved for go back
-- to the head, in their order. Should the pop have emptied the queue (and
-- so dropped its expiry), the rebuilt one lives as long as any waiter may
-- ask, so that no waiter's entry expires before the waiter renews it;
-- entries of processes gone by then are skipped like any other.
local function grant_next(lock, queue, prefix, claim_ms)
  while true do
    local entries = redis.pcall('LPOP', queue, 8)
    -- No queue, or a key of another type there: nobody to serve.
    if type(entries) ~= 'table' or entries.err then
      return nil
    end
    for i, e in ipairs(entries) do
      local wake = string.sub(e, 1, 1) == '~'
      local pid = wake and string.sub(e, 2) or e
      local heard = tell(prefix .. pid, (wake and 'w' or 'r') .. lock)
      if heard > 0 and not wake then
        redis.call('SET', lock, '\0' .. pid, 'PX', claim_ms)
        if i < #entries then
          local rest = {}
          for j = #entries, i + 1, -1 do
            rest[#rest + 1] = entries[j]
          end
          if redis.call('LPUSH', queue, unpack(rest)) == #rest then
            redis.call('PEXPIRE', queue, QUEUE_LIFE_MAX_MS + tonumber(claim_ms) + 1000)
          end
        end
        return pid
      end
    end
    if #entries < 8 then
      return nil
    end
  end
end

-- Appends entry e to queue q unless it is there (the caller may know it is
-- not: `absent`), and keeps q alive for at least ttl_ms (a decimal string,
-- as the scripts get their numbers and pass them on). Fails, before
-- writing anything, when q is a key of another type (the caller's pcall
-- tells it so).
local function enqueue(q, e, ttl_ms, absent)
  local new = false
  if absent or not redis.call('LPOS', q, e) then
    -- A list of one entry was just made, and has no expiry yet.
    new = redis.call('RPUSH', q, e) == 1
  end
  -- One write of the expiry, not a PTTL first: GT only ever lengthens it
  -- (and would leave a new list, which GT counts as never expiring, alone).
  if new then
    redis.call('PEXPIRE', q, ttl_ms)
  else
    redis.call('PEXPIRE', q, ttl_ms, 'GT')
  end
end

-- The score of an expiring index entry whose lock's lease of ttl ms (a
-- decimal string, > 0) starts now: the lease's end, in seconds since the
-- epoch, rounded up to a step of an eighth of the lease in whole seconds
-- (at least one), as a decimal string. The index expires at its highest
-- score, so it outlives each of its locks by less than a step, and its
-- expiry needs a write only when a lease reaches into a new step: about
-- once per step and key, not on every acquisition of a key. (Seconds, not
-- milliseconds: a score that fits 32 bits keeps a small index as small
-- as one scored 0.)
local score_n, score_s
local function index_score(ttl)
  local t = tonumber(ttl)
  local step = t < 16000 and 1 or math.floor(t / 8000)
  local n = math.ceil((now_ms() + t) / (1000 * step)) * step
  -- The same score for every call within a step: printed once (in a
  -- function library, whose state outlives a call).
  if n ~= score_n then
    score_n, score_s = n, string.format('%.0f', n)
  end
  return score_s
end

-- Puts `keys` in the expiring index `o` with the score of a lease of ttl ms
-- from now, raising lower scores (`only_present`: only the entries it has,
-- the others stay out), and the index's expiry with its highest score.
-- Returns whether an entry was added or raised.
local function index_put(o, keys, ttl, only_present)
  local score = index_score(ttl)
  local changed
  if #keys == 1 and not only_present then
    -- A new lock's entry, the common case, without the table.
    changed = redis.call('ZADD', o, 'GT', 'CH', score, keys[1])
  else
    local args = {'GT', 'CH'}
    if only_present then
      table.insert(args, 1, 'XX')
    end
    for i = 1, #keys do
      args[#args + 1] = score
      args[#args + 1] = keys[i]
    end
    changed = redis.call('ZADD', o, unpack(args))
  end
  if changed == 0 then
    return false
  end
  -- GT treats a key without expiry as expiring never: a new index gets
  -- its first expiry by NX.
  if redis.call('EXPIREAT', o, score, 'GT') == 0 then
    redis.call('EXPIREAT', o, score, 'NX')
  end
  return true
end

-- Records the locks `keys`, held by `owner` and expiring in ttl ms (a
-- decimal string; "0": never), in the owner's index: the permanent part
-- `p`, or the expiring part `o` (see index_put). About one change in 16
-- (paced by `token`) also drops up to 8 random entries whose lock is gone,
-- so an owner that goes on taking new keys keeps a small index.
local function index_add(o, p, keys, owner, ttl, token)
  if ttl == '0' then
    local members = {}
    for i = 1, #keys do
      members[2 * i - 1] = '0'
      members[2 * i] = keys[i]
    end
    redis.call('ZADD', p, unpack(members))
    return
  end
  if index_put(o, keys, ttl, false) and token % 16 == 0 then
    for _, k in ipairs(redis.call('ZRANDMEMBER', o, 8)) do
      if not held_by((unflag(redis.pcall('GET', k))), owner) then
        redis.call('ZREM', o, k)
      end
    end
  end
end

-- Gives `lock`, held by `owner` (its value split by unflag: `core`, the
-- contended flag, `tail`), a lease of ttl ms. A lock taken without
-- expiry is rewritten as one with a lease (the nonce's first byte, see
-- above), and its entry, if it has one, moves from the permanent part `p`
-- of the owner's index to the expiring part `o` (pass nil for `o` when the
-- owner is not indexed). The caller raises the entries that stay in `o`
-- (index_put with only_present).
local function set_lease(lock, core, flagged, tail, o, p, owner, ttl)
  if not permanent(core) then
    local relet_tail = tail ~= '' and relet(lock, tail, ttl)
    if relet_tail then
      -- Refused only by a server out of memory, for a script run by
      -- EVALSHA (a function runs with allow-oom): the lease still goes on,
      -- and inspection reports the lock as taken later than it was.
      local v = core .. relet_tail .. (flagged and FLAG or '')
      local set = redis.pcall('SET', lock, v, 'PX', ttl)
      if type(set) ~= 'table' or not set.err then
        return
      end
    end
    redis.call('PEXPIRE', lock, ttl)
    return
  end
  local nonce_at = #core - NONCE_LEN + 1
  core = string.sub(core, 1, nonce_at - 1) .. '_' .. string.sub(core, nonce_at + 1)
  -- (Its tail keeps the clock's reading: true whatever the lease.)
  redis.call('SET', lock, core .. tail .. (flagged and FLAG or ''), 'PX', ttl)
  if o and redis.call('ZREM', p, lock) == 1 then
    index_add(o, p, {lock}, owner, ttl, 1)
  end
end

-- What lock `lock` (its wait queue `queue`) looks like, for inspection:
--   {0, waiting}                   free
--   {1, waiting, owner, token, acquired, pttl, metadata}
--                                  held: owner is "" for an anonymous lock,
--                                  token its newest fencing token, acquired
--                                  the server's clock (ms) when it was
--                                  taken, pttl its lease left in ms (-1:
--                                  none), metadata the holder's ("": none)
--   {2, waiting, pttl}             reserved for a waiting process
--   {3, waiting}                   a value lockstep did not write
-- where waiting is how many processes are queued for it. Also returns the
-- raw value.
local function describe(lock, queue)
  local waiting = redis.pcall('LLEN', queue)
  if type(waiting) ~= 'number' then
    waiting = 0
  end
  local v = redis.pcall('GET', lock)
  local core, _, tail = unflag(v)
  if not v then
    return {0, waiting}, v
  elseif type(v) ~= 'string' then
    return {3, waiting}, v
  elseif string.byte(v, 1) == 0 then
    return {2, waiting, redis.call('PTTL', lock)}, v
  elseif tail == '' then
    return {3, waiting}, v
  end
  local m = #tail - TAIL_LEN
  local token = struct.unpack('>I8', tail, m + 1)
  local pttl = redis.call('PTTL', lock)
  return {
    1, waiting, string.sub(core, 1, #core - NONCE_LEN), token, acquired_of(tail, pttl),
    pttl, string.sub(tail, 1, m)
  }, v
end

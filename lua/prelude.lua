-- prelude.lua: helpers shared by the scripts. lockstep prepends this file to
-- every other script before loading it (the Rust side builds each script as
-- prelude .. script), so it defines functions only and touches no key.
--
-- Values: a lock holds <owner><12-byte nonce>; an anonymous lock holds the
-- nonce alone. A nonce that starts with '.' marks a lock taken without
-- expiry (it is indexed apart; see below). A lock some process waits for
-- carries the *contended* flag, one trailing "\1" byte (owner ids never end
-- a value: the nonce does, so the flag is unambiguous): only then does a
-- release look at the queue. A lock *reserved* for a waiting process holds
-- "\0" .. <pid> (owner ids never contain NUL, so a reservation never looks
-- owned).
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
-- sorted set that lives as long as its longest lock; those without expiry
-- in <owner>:p, a sorted set without expiry. A release removes a lock from
-- :p only: :o entries of released or expired locks stay until the index
-- expires or is trimmed (release_all checks each entry's holder anyway).

local NONCE_LEN = 12
local FLAG = '\1'

-- The value v without its contended flag, and whether it had one.
local function unflag(v)
  if type(v) == 'string' and string.byte(v, -1) == 1 then
    return string.sub(v, 1, -2), true
  end
  return v, false
end

-- Whether the (unflagged) value v is held by owner (anonymous: owner == '').
local function held_by(v, owner)
  return type(v) == 'string' and #v == #owner + NONCE_LEN and string.sub(v, 1, #owner) == owner
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
    local now = redis.call('TIME')
    local us = tonumber(now[1]) * 1000000 + tonumber(now[2])
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
-- is skipped). Stops without popping at an entry equal to `me` (pass '' to
-- treat every entry alike). Returns the pid the lock was reserved for, `me`,
-- or nil when the queue ran out.
local function grant_next(lock, queue, prefix, claim_ms, me)
  while true do
    local e = redis.pcall('LINDEX', queue, 0)
    -- No queue, or a key of another type there: nobody to serve.
    if type(e) ~= 'string' then
      return nil
    end
    if e == me then
      return me
    end
    redis.call('LPOP', queue)
    local wake = string.sub(e, 1, 1) == '~'
    local pid = wake and string.sub(e, 2) or e
    local heard = tell(prefix .. pid, (wake and 'w' or 'r') .. lock)
    if heard > 0 and not wake then
      redis.call('SET', lock, '\0' .. pid, 'PX', claim_ms)
      return pid
    end
  end
end

-- Appends entry e to queue q unless it is there (the caller may know it is
-- not: `absent`), and keeps q alive for at least ttl_ms (a decimal string,
-- as the scripts get their numbers and pass them on).
local function enqueue(q, e, ttl_ms, absent)
  if absent or not redis.call('LPOS', q, e) then
    redis.call('RPUSH', q, e)
  end
  if redis.call('PTTL', q) < tonumber(ttl_ms) then
    redis.call('PEXPIRE', q, ttl_ms)
  end
end

-- Records the locks `keys`, held by `owner` and expiring in ttl ms (a
-- decimal string; "0": never), in the owner's index: the permanent part `p`, or the expiring
-- part `o`, which is kept alive as long as its longest lock. About one new
-- entry in 16 (paced by `token`) also drops up to 8 random entries whose
-- lock is gone, so an owner that goes on taking new keys keeps a small
-- index.
local function index_add(o, p, keys, owner, ttl, token)
  local members = {'0', keys[1]}
  for i = 2, #keys do
    members[2 * i - 1] = '0'
    members[2 * i] = keys[i]
  end
  if ttl == '0' then
    redis.call('ZADD', p, unpack(members))
    return
  end
  if redis.call('ZADD', o, unpack(members)) > 0 then
    -- A new entry, maybe a new index: give it an expiry if it has none
    -- (GT below treats no expiry as infinite).
    redis.call('PEXPIRE', o, ttl, 'NX')
    if token % 16 == 0 then
      for _, k in ipairs(redis.call('ZRANDMEMBER', o, 8)) do
        if not held_by((unflag(redis.pcall('GET', k))), owner) then
          redis.call('ZREM', o, k)
        end
      end
    end
  end
  redis.call('PEXPIRE', o, ttl, 'GT')
end

-- Gives `lock`, held by `owner` (its value `core` without the contended
-- flag, and whether it had one), a lease of ttl ms. A lock taken without
-- expiry is rewritten as one with a lease (the nonce's first byte, see
-- above), and its entry, if it has one, moves from the permanent part `p`
-- of the owner's index to the expiring part `o` (pass nil for `o` when the
-- owner is not indexed). The caller keeps `o` alive as long as its longest
-- lock.
local function set_lease(lock, core, flagged, o, p, owner, ttl)
  if not permanent(core) then
    redis.call('PEXPIRE', lock, ttl)
    return
  end
  local nonce_at = #core - NONCE_LEN + 1
  core = string.sub(core, 1, nonce_at - 1) .. '_' .. string.sub(core, nonce_at + 1)
  redis.call('SET', lock, core .. (flagged and FLAG or ''), 'PX', ttl)
  if o and redis.call('ZREM', p, lock) == 1 then
    index_add(o, p, {lock}, owner, ttl, 1)
  end
end

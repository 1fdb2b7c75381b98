-- prelude.lua: helpers shared by the scripts. lockstep prepends this file to
-- every other script before loading it (the Rust side builds each script as
-- prelude .. script), so it defines functions only and touches no key.
--
-- Values: a lock holds <owner><12-byte nonce>; an anonymous lock holds the
-- nonce alone. A lock *reserved* for a waiting process holds "\0" .. <pid>
-- (owner ids never contain NUL, so a reservation never looks owned).
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

local NONCE_LEN = 12

-- Whether value v is held by owner (anonymous: owner == '').
local function held_by(v, owner)
  return type(v) == 'string' and #v == #owner + NONCE_LEN and string.sub(v, 1, #owner) == owner
end

-- Strictly greater than every token the counter f gave before; see acquire.lua.
local function next_token(f, now_us)
  local last = tonumber(redis.call('GET', f) or '0') or 0
  local token = math.max(last + 1, now_us)
  -- %.0f prints the integer exactly; tostring would switch to exponent form.
  redis.call('SET', f, string.format('%.0f', token))
  return token
end

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
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
    local e = redis.call('LINDEX', queue, 0)
    if not e then
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
-- not: `absent`), and keeps q alive for at least ttl_ms.
local function enqueue(q, e, ttl_ms, absent)
  if absent or not redis.call('LPOS', q, e) then
    redis.call('RPUSH', q, e)
  end
  if redis.call('PTTL', q) < ttl_ms then
    redis.call('PEXPIRE', q, ttl_ms)
  end
end

-- Keeps owner index `index` alive as long as its longest lock: for good
-- while it records a lock without expiry (score inf), else until the latest
-- expiry it records. An empty index is gone already.
local function index_refresh(index)
  local top = redis.call('ZRANGE', index, -1, -1, 'WITHSCORES')
  if not top[2] then
    return
  end
  if top[2] == 'inf' then
    redis.call('PERSIST', index)
  else
    redis.call('PEXPIREAT', index, top[2])
  end
end

-- Records in owner index `index` that `key` (taken at now_ms) expires in
-- ttl ms (0: never), and keeps the index alive as long as its longest lock.
-- Entries of locks expired since are dropped once the index holds more than
-- 32, so it stays small without a sweep on every call.
local function index_add(index, key, now_ms, ttl)
  local score = 'inf'
  if ttl > 0 then
    score = string.format('%.0f', now_ms + ttl)
  end
  redis.call('ZADD', index, score, key)
  if redis.call('ZCARD', index) > 32 then
    redis.call('ZREMRANGEBYSCORE', index, '-inf', string.format('%.0f', now_ms))
  end
  index_refresh(index)
end

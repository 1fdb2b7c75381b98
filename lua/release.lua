-- release.lua: owner-checked release of one or more locks, handing each
-- released lock to the next waiter. (Loaded after prelude.lua.)
--
-- KEYS[1..n]      the lock keys
-- KEYS[n+1..2n]   their fencing counters (see acquire.lua)
-- KEYS[2n+1..3n]  their wait queues
-- KEYS[3n+1]      if ARGV[6] = "1": the permanent part of the releasing
--                 owner's index (entries of locks with a lease stay in the
--                 expiring part until it expires or is trimmed)
-- next KEYS       if ARGV[10] = "1": the successor owner's index, the part
--                 for its lease (expiring if ARGV[9] > 0, else permanent)
-- ARGV[1]   n, the number of lock keys
-- ARGV[2]   owner id; "" means anonymous: only anonymous locks are released
-- ARGV[3]   nonce, or "": with a nonce, only the locks taken by that one
--           acquisition are released (used to undo an acquisition whose reply
--           was lost); without, any lock held by the owner is released
-- ARGV[4]   how long (ms) a reservation lasts before it lapses unclaimed
-- ARGV[5]   channel prefix (see prelude.lua)
-- ARGV[6]   "1" if the releasing owner's index is passed
-- ARGV[7]   successor owner, ARGV[8] successor nonce ("" = no successor),
-- ARGV[9]   successor lease in ms ("0": none), ARGV[10] "1" if its index is
--           passed: a waiter of the releasing process (ARGV[11], its pid) to
--           hand KEYS[1] to directly, if no other process is queued before it
-- ARGV[12]  "1": the releasing process has more waiters after the successor
-- ARGV[13]  how long (ms) a queue touched by this call must live at least
-- ARGV[14]  the successor's metadata for inspection, or ""
-- ARGV[7..14] may be left out altogether: no successor (the common case,
-- eight arguments fewer for the server to turn into Lua strings).
--
-- Returns, for one key without a handoff, 1 if it was released and 0 if
-- not (one integer for the client to parse); otherwise
-- {released_1..released_n, successor_token}: released_i is 1 if
-- KEYS[i] was released, 0 if it was not held by that owner (left untouched);
-- successor_token is the successor's fencing token if KEYS[1] was handed to
-- it, else 0. A released lock flagged as contended goes to the next process
-- queued for it (see grant_next) when there is no successor or another
-- process is first; an unflagged one has nobody waiting and is just
-- deleted.

local n = tonumber(ARGV[1])
local owner = ARGV[2]
local nonce = ARGV[3]
local claim_ms = ARGV[4]
local prefix = ARGV[5]
local k = 3 * n + 1
local index = nil
if ARGV[6] == '1' then
  index = KEYS[k]
  k = k + 1
end
local succ_owner, succ_nonce, succ_ttl = ARGV[7], ARGV[8] or '', ARGV[9]
local succ_index = ARGV[10] == '1' and KEYS[k] or nil
local pid, more, queue_ttl = ARGV[11], ARGV[12] == '1', ARGV[13]
local succ_meta = ARGV[14] or ''

-- Hands lock 1 to the successor: returns its token, or 0 when another
-- process is queued first (the lock is reserved for it then, and the
-- successor keeps its place behind) or the queue is not a list.
local function hand_over(lock, queue)
  while true do
    local e = redis.pcall('LINDEX', queue, 0)
    if type(e) == 'table' then
      redis.call('DEL', lock)
      return 0
    elseif e and string.sub(e, 1, 1) == '~' then
      redis.call('LPOP', queue)
      tell(prefix .. string.sub(e, 2), 'w' .. lock)
    elseif not e or e == pid then
      -- No other process is first: straight to our successor. With more
      -- local waiters our one handoff entry goes to the tail (round robin
      -- between processes) and the lock stays flagged.
      local flagged = more
      if e and more then
        redis.call('LMOVE', queue, queue, 'LEFT', 'RIGHT')
      elseif e then
        redis.call('LPOP', queue)
        flagged = redis.call('LLEN', queue) > 0
      elseif more then
        enqueue(queue, pid, queue_ttl, true)
      end
      local token = next_token(KEYS[n + 1], 0)
      local v = succ_owner .. succ_nonce .. tail_of(token, succ_meta, succ_ttl) .. (flagged and FLAG or '')
      if succ_ttl ~= '0' then
        redis.call('SET', lock, v, 'PX', succ_ttl)
      else
        redis.call('SET', lock, v)
      end
      if succ_index then
        -- The caller passed the part of the index that fits the lease.
        index_add(succ_index, succ_index, {lock}, succ_owner, succ_ttl, token)
      end
      return token
    else
      redis.call('DEL', lock)
      grant_next(lock, queue, prefix, claim_ms)
      -- Our successor keeps its place behind.
      enqueue(queue, pid, queue_ttl, false)
      return 0
    end
  end
end

-- Whether the (unflagged) value v is the releasing owner's (with a nonce:
-- that acquisition's).
local function mine(v)
  if nonce ~= '' then
    return v == owner .. nonce
  end
  return held_by(v, owner)
end

if n == 1 then
  -- One lock, the common case, without the tables below, answered with
  -- one integer unless the lock went to the successor.
  local lock = KEYS[1]
  local core, flagged = unflag(redis.pcall('GET', lock))
  if not mine(core) then
    return 0
  end
  if flagged and succ_nonce ~= '' then
    local token = hand_over(lock, KEYS[3])
    if index and permanent(core) then
      redis.call('ZREM', index, lock)
    end
    return token > 0 and {1, token} or 1
  end
  redis.call('DEL', lock)
  if index and permanent(core) then
    redis.call('ZREM', index, lock)
  end
  if flagged then
    grant_next(lock, KEYS[3], prefix, claim_ms)
  end
  return 1
end

-- Several locks. A key of another type reads as nil here: not ours, left
-- alone.
local values = redis.call('MGET', unpack(KEYS, 1, n))
local result, gone, permanents, contended = {}, {}, {}, {}
local succ_token = 0
for i = 1, n do
  local core, flagged = unflag(values[i])
  local ours = mine(core)
  result[i] = ours and 1 or 0
  if ours then
    if index and permanent(core) then
      permanents[#permanents + 1] = KEYS[i]
    end
    if flagged and i == 1 and succ_nonce ~= '' then
      succ_token = hand_over(KEYS[1], KEYS[2 * n + 1])
    else
      gone[#gone + 1] = KEYS[i]
      if flagged then
        contended[#contended + 1] = i
      end
    end
  end
end
if #gone > 0 then
  redis.call('DEL', unpack(gone))
end
if #permanents > 0 then
  redis.call('ZREM', index, unpack(permanents))
end
for _, i in ipairs(contended) do
  grant_next(KEYS[i], KEYS[2 * n + i], prefix, claim_ms)
end
result[n + 1] = succ_token
return result

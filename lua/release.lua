-- release.lua: owner-checked release of one or more locks, handing each
-- released lock to the next waiter. (Loaded after prelude.lua.)
--
-- KEYS[1..n]      the lock keys
-- KEYS[n+1..2n]   their fencing counters (see acquire.lua)
-- KEYS[2n+1..3n]  their wait queues
-- KEYS[3n+1]      if ARGV[6] = "1": the releasing owner's index
-- next KEYS       if ARGV[10] = "1": the successor owner's index
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
--
-- Returns {released_1..released_n, successor_token}: released_i is 1 if
-- KEYS[i] was released, 0 if it was not held by that owner (left untouched);
-- successor_token is the successor's fencing token if KEYS[1] was handed to
-- it, else 0. A released lock goes to the next process queued for it (see
-- grant_next) when there is no successor or another process is first.

local n = tonumber(ARGV[1])
local owner = ARGV[2]
local nonce = ARGV[3]
local claim_ms = tonumber(ARGV[4])
local prefix = ARGV[5]
local k = 3 * n + 1
local index = nil
if ARGV[6] == '1' then
  index = KEYS[k]
  k = k + 1
end
local succ_owner, succ_nonce, succ_ttl = ARGV[7], ARGV[8], tonumber(ARGV[9])
local succ_index = ARGV[10] == '1' and KEYS[k] or nil
local pid, more, queue_ttl = ARGV[11], ARGV[12] == '1', tonumber(ARGV[13])

local result = {}
local succ_token = 0
for i = 1, n do
  local lock, queue = KEYS[i], KEYS[2 * n + i]
  local v = redis.pcall('GET', lock)
  local mine
  if nonce ~= '' then
    mine = v == owner .. nonce
  else
    mine = held_by(v, owner)
  end
  result[i] = 0
  if mine then
    redis.call('DEL', lock)
    if index then
      redis.call('ZREM', index, lock)
      -- A lock without expiry kept the index for good: it may not now.
      index_refresh(index)
    end
    result[i] = 1
    local qtype = redis.call('TYPE', queue)['ok']
    if i == 1 and succ_nonce ~= '' and (qtype == 'list' or qtype == 'none') then
      while true do
        local e = redis.call('LINDEX', queue, 0)
        if e and string.sub(e, 1, 1) == '~' then
          redis.call('LPOP', queue)
          tell(prefix .. string.sub(e, 2), 'w' .. lock)
        elseif not e or e == pid then
          -- No other process is first: straight to our successor.
          if e then
            redis.call('LPOP', queue)
          end
          if succ_ttl > 0 then
            redis.call('SET', lock, succ_owner .. succ_nonce, 'PX', succ_ttl)
          else
            redis.call('SET', lock, succ_owner .. succ_nonce)
          end
          local now = now_us()
          succ_token = next_token(KEYS[n + 1], now)
          if more then
            -- Our one handoff entry was at the head, or there was none.
            enqueue(queue, pid, queue_ttl, true)
          end
          if succ_index then
            index_add(succ_index, lock, math.floor(now / 1000), succ_ttl)
          end
          break
        else
          grant_next(lock, queue, prefix, claim_ms, '')
          -- Our successor keeps its place behind.
          enqueue(queue, pid, queue_ttl, false)
          break
        end
      end
    elseif qtype == 'list' then
      grant_next(lock, queue, prefix, claim_ms, '')
    end
  end
end
result[n + 1] = succ_token
return result

-- A call's events, atomically: Redis runs a script to completion before any other command, so
-- no reader sees half an update, concurrent adds for one user cannot interleave, and a call of
-- several users is applied whole (event-id conflicts are checked for all of them first).
-- KEYS: per user, (profile, event log, event payloads). ARGV: max_recent, event_ttl_s, now (s),
-- now (ms), max_event_ids, then per user: its number of events n, then n x (item, event_id,
-- time in ms), with "" for no event id and for no time (then: now). Returns {applied} or
-- {-1, conflicting ids...}.
local max_recent, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local now, now_ms, max_ids = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local cutoff = now - ttl

-- The rule of profiles.place: an item sits at its latest event, after items of the same time.
local function place(recent, times, item, t)
  for j = 1, #recent do
    if recent[j] == item then
      if times[j] > t then return end
      table.remove(recent, j)
      table.remove(times, j)
      break
    end
  end
  local at = #recent + 1
  while at > 1 and times[at - 1] > t do at = at - 1 end
  table.insert(recent, at, item)
  table.insert(times, at, t)
  if #recent > max_recent then
    table.remove(recent, 1)
    table.remove(times, 1)
  end
end

-- Pass 1: read the call, and refuse it whole if an event id is taken by another payload.
local users, conflicts, a = {}, {}, 6
while a <= #ARGV do
  local k = #users * 3
  local log, payloads = KEYS[k + 2], KEYS[k + 3]
  local events, claimed = {}, {}
  for i = 1, tonumber(ARGV[a]) do
    local item, id, t = ARGV[a + 3 * i - 2], ARGV[a + 3 * i - 1], ARGV[a + 3 * i]
    local payload = item .. ':' .. t
    if id ~= '' then
      if claimed[id] == nil then
        local at = redis.call('ZSCORE', log, id)
        claimed[id] = payload
        if at and tonumber(at) > cutoff then
          claimed[id] = redis.call('HGET', payloads, id) or payload  -- none: logged before payloads
        end
      end
      if claimed[id] ~= payload then conflicts[#conflicts + 1] = id end
    end
    events[i] = {tonumber(item), id, t == '' and now_ms or tonumber(t), payload}
  end
  users[#users + 1] = {KEYS[k + 1], log, payloads, events}
  a = a + 1 + 3 * #events
end
if #conflicts > 0 then return {-1, unpack(conflicts)} end

-- Pass 2: apply, user by user.
local applied = 0
for _, user in ipairs(users) do
  local key, log, payloads, events = user[1], user[2], user[3], user[4]
  local expired = redis.call('ZRANGEBYSCORE', log, '-inf', cutoff)
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', log, '-inf', cutoff)
    for i = 1, #expired, 1000 do
      redis.call('HDEL', payloads, unpack(expired, i, math.min(i + 999, #expired)))
    end
  end
  local data = redis.call('GET', key) or ''

  -- recent and its times: decoded in full (they are short); pos ends on the first byte of seen.
  local recent, times, pos = {}, {}, 1
  if #data > 0 then
    local v2 = string.byte(data, 1) == 254
    local n
    if v2 then pos = 2 end
    n, pos = read(data, pos)
    for i = 1, n do recent[i], pos = read(data, pos) end
    local t = 0
    for i = 1, n do
      if v2 then
        local gap
        gap, pos = read(data, pos)
        t = t + gap
      end
      times[i] = t
    end
  end

  local new, fresh, count, logged = {}, {}, 0, false
  for _, e in ipairs(events) do
    local item, id = e[1], e[2]
    if id == '' or not redis.call('ZSCORE', log, id) then
      place(recent, times, item, e[3])
      if not fresh[item] then
        fresh[item] = true
        new[#new + 1] = item
      end
      if id ~= '' then
        redis.call('ZADD', log, now, id)
        redis.call('HSET', payloads, id, e[4])
        logged = true
      end
      count = count + 1
    end
  end
  if logged then
    redis.call('EXPIRE', log, ttl)
    redis.call('EXPIRE', payloads, ttl)
    local excess = redis.call('ZCARD', log) - max_ids
    if excess > 0 then  -- the oldest ids go first
      local old = redis.call('ZRANGE', log, 0, excess - 1)
      redis.call('ZREMRANGEBYRANK', log, 0, excess - 1)
      for i = 1, #old, 1000 do
        redis.call('HDEL', payloads, unpack(old, i, math.min(i + 999, #old)))
      end
    end
  end
  if count > 0 then
    table.sort(new)
    -- seen: merge the sorted new items in one walk. Bytes from `from` to `at` - 1 are copied
    -- unchanged; `orig` is the last stored item walked past, `last` the last item written. A
    -- stored gap is relative to orig, so it is re-encoded only where an insert made last ~= orig.
    local out, from, at, orig, last = {}, pos, pos, 0, 0
    for _, x in ipairs(new) do
      local v, nxt = nil, nil
      while at <= #data do
        local gap = string.byte(data, at)
        if gap < 128 then nxt = at + 1 else gap, nxt = read(data, at) end
        v = orig + gap
        if v >= x then break end
        if last ~= orig then
          out[#out + 1] = varint(v - last)
          from = nxt
        end
        orig, last, at, v = v, v, nxt, nil
      end
      if v ~= x then  -- not stored yet: insert it before the item at `at`
        out[#out + 1] = string.sub(data, from, at - 1)
        out[#out + 1] = varint(x - last)
        last, from = x, at
      end
    end
    if at <= #data and last ~= orig then
      local gap, nxt = read(data, at)
      out[#out + 1] = string.sub(data, from, at - 1) .. varint(orig + gap - last)
      from = nxt
    end
    out[#out + 1] = string.sub(data, from)

    local head = {string.char(254), varint(#recent)}
    for i = 1, #recent do head[#head + 1] = varint(recent[i]) end
    local previous = 0
    for i = 1, #times do
      head[#head + 1] = varint(times[i] - previous)
      previous = times[i]
    end
    redis.call('SET', key, table.concat(head) .. table.concat(out))
    applied = applied + count
  end
end
return {applied}

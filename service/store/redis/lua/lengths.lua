-- The stored length of each of a hash's fields (0: not stored), in one call: a pipeline of
-- 10,000 HSTRLEN took a start 0.5 s of parsing replies.
-- KEYS[1]: the hash; ARGV: the fields.
local lengths = {}
for i, field in ipairs(ARGV) do
  lengths[i] = redis.call('HSTRLEN', KEYS[1], field)
end
return lengths

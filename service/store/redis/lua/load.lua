-- Replace one user's profile atomically. KEYS: profile, event log, event payloads. ARGV: the
-- encoded profile.
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
if ARGV[1] ~= '' then redis.call('SET', KEYS[1], ARGV[1]) end
return 0

-- Varints in Lua: numbers are doubles, exact for the ids allowed (< 2^53).
local function varint(x)
  local bytes = {}
  while x >= 128 do
    bytes[#bytes + 1] = x % 128 + 128
    x = math.floor(x / 128)
  end
  bytes[#bytes + 1] = x
  return string.char(unpack(bytes))
end

-- The varint starting at byte pos of s, and the position just after it.
local function read(s, pos)
  local x, scale, b = 0, 1, string.byte(s, pos)
  while b >= 128 do
    x = x + (b - 128) * scale
    scale = scale * 128
    pos = pos + 1
    b = string.byte(s, pos)
  end
  return x + b * scale, pos + 1
end

"""How a profile is stored: one string of varints.

The profile is one string: the byte 0xFE, then unsigned LEB128 varints (7 bits a byte, low bits
first, the high bit set on every byte but a number's last)::

    n, recent_1 .. recent_n, time_1, time_2 - time_1, .., seen_1, seen_2 - seen_1, ...

``recent`` oldest first by event time (ms; ties by arrival), with each item's latest event
time; ``seen`` sorted ascending and stored as gaps. A profile written before times were kept
starts with n itself (< 0x80) and has no times: it reads as times 0, older than any live event,
and the next write rewrites it. No user, no key (an empty profile is never stored).

Why one string: a Redis key costs about 60 bytes of overhead (dict entry, key, object) before
its value, and a set of small integers about 2 bytes an item (4 beyond 32767,
a hash table of ~50 bytes an item beyond 512 items). One key whose gaps mostly fit one byte
(a user's ~100 items out of 1682 are ~16 apart) is about 3x smaller on MovieLens-100K histories,
and a read is one ``GET`` of one key. Lua numbers are doubles, hence ``MAX_ITEM_ID = 2**53 - 1``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import accumulate

from service.store.profiles import Profile


def _put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def _varints(data: bytes) -> list[int]:
    """Every varint of ``data``. Most are one byte, so the loop's cheap branch comes first."""
    values: list[int] = []
    value = shift = 0
    for byte in data:
        if byte < 0x80:
            values.append(value | byte << shift)
            value = shift = 0
        else:
            value |= (byte & 0x7F) << shift
            shift += 7
    return values


VERSION_2 = 0xFE  # first byte of a profile with event times; never a v1 profile's first


def encode_profile(
    recent: Sequence[int], seen: Iterable[int], times: Sequence[int] | None = None
) -> bytes:
    """The stored form of a profile (see the module docstring); ``b""`` when it is empty.
    ``seen`` may hold repeats; ids must already be checked (:func:`item_id`). ``times``: of
    ``recent``, in ms, non-decreasing (None: all 0, as for a loaded history)."""
    ordered = sorted(set(seen))
    if not ordered and not recent:
        return b""
    times = list(times) if times is not None else [0] * len(recent)
    out = bytearray([VERSION_2])
    _put_varint(out, len(recent))
    for item in recent:
        _put_varint(out, item)
    previous = 0
    for value in times:
        _put_varint(out, value - previous)
        previous = value
    previous = 0
    for item in ordered:
        _put_varint(out, item - previous)
        previous = item
    return bytes(out)


def decode_profile(data: bytes | None) -> Profile:
    """The profile stored as ``data`` (``None``, a missing key, is the empty profile); reads
    profiles stored before event times were (their times are 0) as well."""
    if not data:
        return Profile([], frozenset())
    if data[0] != VERSION_2:
        values = _varints(data)
        end = values[0] + 1
        recent = values[1:end]
        return Profile(recent, frozenset(accumulate(values[end:])), (0,) * len(recent))
    values = _varints(data[1:])
    n = values[0]
    recent, gaps = values[1 : n + 1], values[n + 1 : 2 * n + 1]
    return Profile(recent, frozenset(accumulate(values[2 * n + 1 :])), tuple(accumulate(gaps)))

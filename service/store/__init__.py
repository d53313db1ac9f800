"""Online user state: profiles (recent and seen items) in process or in Redis."""

from service.store.profiles import (
    MAX_ITEM_ID,
    Interaction,
    MemoryProfileStore,
    Profile,
    ProfileStore,
    RedisProfileStore,
    decode_profile,
    encode_profile,
    recent_of,
)

__all__ = [
    "MAX_ITEM_ID",
    "Interaction",
    "MemoryProfileStore",
    "Profile",
    "ProfileStore",
    "RedisProfileStore",
    "decode_profile",
    "encode_profile",
    "recent_of",
]

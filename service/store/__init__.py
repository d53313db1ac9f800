"""Online user state: profiles (recent and seen items) in process or in Redis."""

from service.store.codec import decode_profile, encode_profile
from service.store.memory import MemoryProfileStore
from service.store.profiles import (
    MAX_ITEM_ID,
    Interaction,
    Profile,
    ProfileStore,
    StoreUnavailable,
    recent_of,
)
from service.store.redis.profiles import RedisProfileStore
from service.store.resilient import ProfileCache, ProfileRead, ResilientStore

__all__ = [
    "MAX_ITEM_ID",
    "Interaction",
    "MemoryProfileStore",
    "Profile",
    "ProfileCache",
    "ProfileRead",
    "ProfileStore",
    "RedisProfileStore",
    "ResilientStore",
    "StoreUnavailable",
    "decode_profile",
    "encode_profile",
    "recent_of",
]

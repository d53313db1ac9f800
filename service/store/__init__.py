"""Online user state: profiles (recent and seen items) in process or in Redis."""

from service.store.profiles import (
    Interaction,
    MemoryProfileStore,
    ProfileStore,
    RedisProfileStore,
    recent_of,
)

__all__ = ["Interaction", "MemoryProfileStore", "ProfileStore", "RedisProfileStore", "recent_of"]

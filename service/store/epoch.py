"""Noticing a Redis that came back empty, and restoring what can be restored.

Redis may restart without its data (a lost volume, a failover to an empty replica). Profiles are
then gone: answers stop being personal, seen items are recommended again, and nothing fails.
So the service keeps an *epoch* key in Redis: a random token written once when the data set is
first set up. Each process remembers the token it saw; when the key is missing, or holds another
token, the data the process knew is gone.

On noticing, :class:`EpochWatch` logs an error, counts it (``losses``, for /metrics), keeps a
description for /readyz, and, when the service was started with histories (a dataset), writes a
new epoch and merges the histories back (``RedisProfileStore.merge``: as events older than any
live one, so writes that reached the empty Redis in between are kept, and land after them).
A process that starts while Redis is down cannot know the data set yet: it serves degraded
reads, and its first check that reaches Redis sets it up as start-up would have (adopting the
epoch, or writing a fresh one and merging its histories in, not loading them over what was
written meanwhile), without reporting a loss.

Only the process that writes the new epoch restores; others see a token they did not know,
count the loss and say so (a token it did not know can also be another data set altogether:
they cannot be told apart, and the report says both).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from service.store.profiles import StoreUnavailable

log = logging.getLogger("visrec.store")


class EpochStore(Protocol):
    async def read_epoch(self) -> str | None: ...

    async def claim_epoch(self, token: str) -> str:
        """Write ``token`` unless an epoch exists; the epoch now stored, either way."""
        ...

    async def merge(self, histories: Mapping[str, Sequence[int]]) -> None: ...


class EpochWatch:
    def __init__(
        self,
        store: EpochStore,
        *,
        histories: Mapping[str, Sequence[int]] | None = None,
        on_loss: Callable[[], object] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.histories = histories
        self.losses = 0
        self.lost: str | None = None  # what happened at the last loss, for /readyz
        self._known: str | None = None
        self._on_loss = on_loss
        self._clock = clock
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Adopt the stored epoch, or set one up (a fresh Redis: nothing was lost). Raises
        StoreUnavailable when Redis cannot answer: then the first :meth:`check` that reaches
        it sets it up."""
        self._known = await self.store.claim_epoch(secrets.token_hex(8))

    async def check(self) -> None:
        """Compare the stored epoch with the known one; on a loss, report and restore. While
        one check restores, others wait for it. Never raises StoreUnavailable."""
        async with self._lock:
            try:
                if self._known is None:  # started while Redis was down
                    await self._set_up()
                    return
                current = await self.store.read_epoch()
                if current == self._known:
                    return
                await self._lost(current)
            except StoreUnavailable:
                return  # ping says so; the next check tries again

    async def run(self, every_s: float) -> None:
        """Check every ``every_s`` seconds until cancelled."""
        while True:
            await asyncio.sleep(every_s)
            await self.check()

    async def _set_up(self) -> None:
        """What start-up could not do: adopt the data set's epoch, or write a fresh one and
        merge the histories in."""
        token = secrets.token_hex(8)
        current = await self.store.claim_epoch(token)
        if current == token and self.histories:
            await self.store.merge(self.histories)
            log.warning("Redis answers: profiles of %d users merged in", len(self.histories))
        self._known = current

    async def _lost(self, current: str | None) -> None:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self._clock()))
        self.losses += 1
        self._on_loss()
        if current is None:  # empty: whoever writes the new epoch first restores
            token = secrets.token_hex(8)
            current = await self.store.claim_epoch(token)
            what = "came back empty" + await self._restored(first=current == token)
        else:  # it cannot be told which: say both
            what = (
                f"holds another data set than the one this process knew (epoch {current}, not "
                f"{self._known}): it came back empty and another process set it up again, or "
                "it was replaced; whatever this process knew of users is gone"
            )
        self.lost = f"Redis lost its data at {when}: it {what}"
        log.error("%s", self.lost)
        self._known = current

    async def _restored(self, *, first: bool) -> str:
        """What became of the profiles after an empty Redis, in words (restoring them when
        this process is the one to)."""
        if not first:
            return (
                "; another process set it up again first (it reloads the profiles if it was "
                "started with them)"
            )
        if not self.histories:
            return "; the service was started without profiles to reload: users' histories are gone"
        await self.store.merge(self.histories)
        return f"; profiles of {len(self.histories):,} users reloaded from the dataset"

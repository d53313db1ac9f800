"""Noticing a Redis that lost its data, and putting the dataset's histories in, once.

Redis may restart without its data (a lost volume, a failover to an empty replica). Profiles are
then gone: answers stop being personal, seen items are recommended again, and nothing fails.
So the service keeps an *epoch* key in Redis: a random token written once when the data set is
first set up. Each process remembers the token it saw; when the key is missing, or holds another
token, the data the process knew is gone.

The dataset's histories (``visrec-serve --load-profiles``) go into a data set once: a process
started with them merges them in (``RedisProfileStore.merge``: as events older than any live
one, so what users did since is kept) only when the data set's *loaded* marker, a key beside
the epoch, is missing, and sets it after. A worker or replica that starts later, or a
replacement for one that died, finds the marker and loads nothing: loading at every start
replaced the live profiles (and the event-id logs, so retries were applied twice).

On a loss, every process also writes back the live events it acknowledged and still keeps
(:mod:`service.store.journal`), so what users did since the data set was set up survives too,
as far as the living processes' journals reach.

On a loss, :class:`EpochWatch` logs an error, counts it (``losses``, for /metrics) and keeps a
description for /readyz. Any process writes a new epoch when the key is missing (so the next
loss is noticed too); every process started with histories then sees the marker missing and
merges them back, and retries at its next check until that is done, whoever wrote the epoch (a
process without histories claiming it first kept the one with them from restoring). A process
that starts while Redis is down serves degraded reads; its first check that reaches Redis sets
it up as start-up would have, without reporting a loss.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from service.store.journal import Journal
from service.store.profiles import Interaction, StoreUnavailable

log = logging.getLogger("visrec.store")


class EpochStore(Protocol):
    async def read_epoch(self) -> str | None: ...

    async def claim_epoch(self, token: str) -> str:
        """Write ``token`` unless an epoch exists; the epoch now stored, either way."""
        ...

    async def histories_loaded(self) -> bool: ...

    async def mark_histories_loaded(self) -> None: ...

    async def merge(
        self,
        histories: Mapping[str, Sequence[int]],
        times: Mapping[str, Sequence[float]] | None = None,
    ) -> None: ...

    async def add(self, events: Sequence[Interaction]) -> int: ...


class EpochWatch:
    def __init__(
        self,
        store: EpochStore,
        *,
        histories: Mapping[str, Sequence[int]] | None = None,
        times: Mapping[str, Sequence[float]] | None = None,
        journal: Journal | None = None,
        on_loss: Callable[[], object] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.histories = histories
        self.times = times  # of the histories' items, seconds
        self.journal = journal  # the events this process acknowledged, written back on a loss
        self.losses = 0
        self.lost: str | None = None  # what happened at the last loss, for /readyz
        self._known: str | None = None  # the epoch of the data set this process serves
        self._pending = False  # histories to merge back (a loss, or a start while down)
        self._replay = False  # the journal to write back (a loss)
        self._on_loss = on_loss
        self._clock = clock
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Adopt the stored epoch, or set one up (a fresh Redis: nothing was lost), and merge
        the histories in if the data set has not had them. Raises StoreUnavailable when Redis
        cannot answer: then the first :meth:`check` that reaches it does this."""
        self._pending = True
        self._known = await self.store.claim_epoch(secrets.token_hex(8))
        await self._load()

    async def check(self) -> None:
        """Compare the stored epoch with the known one; on a loss, report and restore. While
        one check restores, others wait for it. Never raises StoreUnavailable."""
        async with self._lock:
            try:
                if self._known is not None:  # else: started while Redis was down
                    current = await self.store.read_epoch()
                    if current == self._known:
                        await self._load()  # if a merge is still to be done
                        return
                    self._lost(current is None)
                    self._known = None  # reported once; set up again now or next time
                await self.start()
            except StoreUnavailable:
                return  # ping says so; the next check tries again

    async def run(self, every_s: float) -> None:
        """Check every ``every_s`` seconds until cancelled."""
        while True:
            await asyncio.sleep(every_s)
            await self.check()

    async def _load(self) -> None:
        """Merge the histories in unless the data set had them, and after a loss write the
        journal back; retried until done (writing an event twice changes nothing)."""
        if not self._pending:
            return
        if self.histories and not await self.store.histories_loaded():
            await self.store.merge(self.histories, self.times)
            await self.store.mark_histories_loaded()
            log.warning("profiles of %d users merged into Redis", len(self.histories))
            if self.lost:
                self.lost += f"; profiles of {len(self.histories):,} users merged back"
        if self._replay and self.journal is not None:
            written = await self.journal.replay(self.store.add)
            note = f"{written:,} events this process had acknowledged written back"
            if self.journal.forgotten:
                note += f" (it no longer held {self.journal.forgotten:,} older ones: lost)"
            log.warning("%s", note)
            self.lost = f"{self.lost}; {note}" if self.lost else note
        self._replay = False
        self._pending = False

    def _lost(self, empty: bool) -> None:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self._clock()))
        self._replay = True
        self.losses += 1
        self._on_loss()
        what = (
            "came back empty"
            if empty
            else "holds another data set than the one this process knew (it came back empty "
            "and another process set it up again, or it was replaced)"
        )
        then = (
            "this process merges the dataset's histories back in"
            if self.histories
            else "this process was started without the dataset's histories: a process started "
            "with them (--load-profiles) merges them back, if there is one, else they are gone"
        )
        self.lost = f"Redis lost its data at {when}: it {what}; {then}"
        log.error("%s", self.lost)

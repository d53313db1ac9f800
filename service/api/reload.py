"""Model updates while serving: the engine in use lives in a ``ModelSlot``; a reload builds the
next one on a worker thread, tries it on a query, then swaps it in with one assignment.

A request reads ``slot.engine`` once and keeps that engine to its end (a micro-batch runs wholly
on the engine it started with and each answer carries that engine's version), so every answer
comes from, and names, exactly one model: the old one or the new one. Checkpoint or features that
cannot be read, or do not belong together, leave the old engine serving and the error says why.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from service.engine import Source
from service.model.checkpoint import CheckpointError
from service.model.feature_store import FeatureError
from service.recommender import Query, Recommendation, Recommender

log = logging.getLogger("visrec.reload")


@dataclass(frozen=True)
class Swap:
    previous: str  # version that served before
    current: str  # version that serves now
    source: Source
    seconds: float  # to load and try the new engine


class ReloadFailed(Exception):
    """The new engine could not be built; the old one still serves. The message says why."""


class ReloadBusy(Exception):
    """Another reload is running."""


Loader = Callable[[Source], Recommender]


class ModelSlot:
    """The engine that serves now, and the one way to replace it."""

    def __init__(self, engine: Recommender, source: Source, load: Loader) -> None:
        self.engine = engine
        self.source = source
        self._load = load
        self._reloading = asyncio.Lock()

    def recommend(self, queries: Sequence[Query]) -> list[Recommendation]:
        """The micro-batcher's function: the batch runs on the engine current when it starts."""
        return self.engine.recommend(queries)

    async def reload(self, checkpoint: Path | None = None, features: Path | None = None) -> Swap:
        """Build an engine from the given files (default: those of the serving engine, read
        again) off the event loop and swap it in. Raises ReloadBusy while another reload runs
        and ReloadFailed, the old engine still serving, when the new one cannot be built."""
        if self._reloading.locked():
            raise ReloadBusy("another reload is running; retry when it has finished")
        async with self._reloading:
            source = Source(checkpoint or self.source.checkpoint, features or self.source.features)
            start = time.perf_counter()
            try:
                engine = await asyncio.to_thread(self._build, source)
            except Exception as err:  # whatever it was, the old engine keeps serving
                log.warning("reload of %s failed: %s", source.checkpoint, err)
                raise ReloadFailed(_reason(err)) from err
            previous, self.engine, self.source = self.engine, engine, source
            # As at start-up: what lives as long as the app stays out of full GC passes.
            gc.freeze()
        swap = Swap(previous.version, engine.version, source, time.perf_counter() - start)
        log.info("model %s replaced %s (%.2f s)", swap.current, swap.previous, swap.seconds)
        return swap

    async def update(self, change: Callable[[Recommender], Recommender]) -> Recommender:
        """Build the next engine from the serving one with ``change`` (e.g. items added) off
        the event loop and swap it in. Waits for a reload or another update to finish first,
        so neither is lost; an exception leaves the serving engine as it was."""
        async with self._reloading:
            engine = await asyncio.to_thread(change, self.engine)
            self.engine = engine
            gc.freeze()
        return engine

    def warm_up(self) -> None:
        """One real query on the serving engine (see :func:`_probe`)."""
        _probe(self.engine)

    def _build(self, source: Source) -> Recommender:
        engine = self._load(source)
        _probe(engine)
        return engine


def _probe(engine: Recommender) -> None:
    """One real query (attention, index search) before any request gets it: a model that cannot
    answer fails here, and the first requests do not pay for lazy initialisation."""
    (probe,) = engine.recommend([Query(None, engine.item_ids[:1].tolist(), (), k=10)])
    if probe.fallback or not probe.items:
        raise ReloadFailed("the new model gave no recommendation for a one-item history")


def _reason(err: Exception) -> str:
    """What went wrong, for the operator: our own errors say it in words already."""
    if isinstance(err, CheckpointError | FeatureError | ReloadFailed):
        return str(err)
    return f"{type(err).__name__}: {err}"


@contextmanager
def reload_on_hangup(slot: ModelSlot, loop: asyncio.AbstractEventLoop) -> Iterator[bool]:
    """While open, SIGHUP reloads the serving files (e.g. a checkpoint replaced in place).
    Yields whether the handler is installed: signals reach only a loop in the main thread
    (as under uvicorn, not under a test client)."""
    tasks: set[asyncio.Task[None]] = set()

    def hangup() -> None:
        task = loop.create_task(_reload_logged(slot))
        tasks.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(tasks.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, hangup)
        installed = True
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):
        installed = False  # not the main thread, or no SIGHUP (Windows)
    try:
        yield installed
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGHUP)
        for task in tasks:  # a reload still loading at shutdown is given up
            task.cancel()


async def _reload_logged(slot: ModelSlot) -> None:
    try:
        await slot.reload()
    except (ReloadBusy, ReloadFailed) as err:  # reload() logged the cause
        log.error("SIGHUP reload refused: %s", err)

"""What an app runs on, from start to stop: its lifespan (:func:`serving`) loads the model,
its added items and the catalogue, opens the profile store, and keeps them current (added items
from other replicas, the registry's published version, Redis's epoch) until the app stops."""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from service.api.batcher import MicroBatcher
from service.api.feedback import Feedback
from service.api.items import Items, weights_refusal
from service.api.metrics import Metrics
from service.api.patches import Patches
from service.api.state import State
from service.catalogue import Catalogue, load_catalogue
from service.config import Settings
from service.engine import (
    ModelSlot,
    Preloaded,
    ReloadBusy,
    open_slot,
    registry_of,
    reload_on_hangup,
    start_source,
)
from service.model.feature_store import BACKBONE_FILE, load_features
from service.registry import Current, Registry, follow
from service.runtime import pick_device, torch_threads
from service.store.epoch import EpochWatch
from service.store.feedback import FeedbackLog, MemoryFeedback, RedisFeedback
from service.store.items import DirectoryItemStore, ItemStore, MemoryItemStore, RedisItemStore
from service.store.journal import Journal
from service.store.memory import MemoryProfileStore
from service.store.patches import FileTable, ItemTable, MemoryTable, RedisTable
from service.store.profiles import StoreUnavailable
from service.store.redis.profiles import RedisProfileStore
from service.store.resilient import ResilientStore

log = logging.getLogger("visrec.api")
EPOCH_CHECK_S = 1.0  # how often a process looks whether Redis came back empty
# A stop gives the background tasks, then each store's close, this long each: one that is
# stuck is named in the log with where it waits, and left, so a stop always ends.
STOP_STEP_S = 10.0
# and cancels a task again this often while it runs: on Python 3.11 redis-py lets most cancels
# that reach a call go (the call returns as if none came; pyproject.toml), which left a stop
# waiting out its STOP_STEP_S
RECANCEL_S = 0.1


@asynccontextmanager
async def serving(
    settings: Settings,
    metrics: Metrics,
    *,
    profiles: Mapping[str, Sequence[int]] | None = None,
    times: Mapping[str, Sequence[float]] | None = None,
    preloaded: Preloaded | None = None,
) -> AsyncIterator[State]:
    """Everything a running app needs, built in order and taken down in reverse: the added
    items, the model (``preloaded``, or the registry's current version, or the configured
    files), the catalogue, the profile store (``profiles``, at their ``times``, go into it: into
    Redis once per data set, :mod:`service.store.epoch`), and the tasks that keep them current."""
    items = await run_in_threadpool(_items, settings)
    items.on_loss = metrics.items_lost.inc
    patches = await _patches(settings)
    registry = registry_of(settings)
    if preloaded is None:
        source, current = await run_in_threadpool(start_source, settings, registry)
        engine = None
    else:
        source, current, engine = preloaded.source, preloaded.serving, preloaded.engine
    models = await run_in_threadpool(open_slot, settings, items.added_to, source, engine)
    metrics.model_version = lambda: models.engine.version
    catalogue = await run_in_threadpool(load_catalogue, settings.data)  # titles, images
    try:  # added by an earlier run or another replica; every core, as nothing else runs
        with torch_threads(os.cpu_count() or 1):
            await items.sync(models, catalogue)
    except StoreUnavailable as err:  # the periodic sync picks them up once it answers
        log.warning("starting without the added items: the item store is down (%s)", err)
    store, name, watch = _profile_store(settings, metrics, profiles, times)
    await _fill(store, watch, profiles, times)
    gc.freeze()  # what lives as long as the app, out of full GC passes (a loaded p99's pauses)
    tasks = _keeping_current(settings, registry, items, models, catalogue, watch, current)
    tasks.append(asyncio.create_task(patches.keep_current(), name="patches.keep_current"))
    feedback = Feedback(_feedback_log(settings), metrics)
    try:
        window = settings.batch_window_ms / 1000
        with reload_on_hangup(models, asyncio.get_running_loop()):
            # The batcher asks the slot, so a batch runs on the engine current at its start.
            async with MicroBatcher(models.recommend, window_s=window) as batcher:
                yield State(
                    models,
                    store,
                    name,
                    batcher,
                    watch,
                    items,
                    patches,
                    catalogue,
                    metrics,
                    feedback,
                )
    finally:
        await ended(tasks, STOP_STEP_S, cancel=True)
        for close in (feedback.close, store.close, items.store.close, patches.close):
            await ended([asyncio.create_task(close(), name=close.__qualname__)], STOP_STEP_S)


async def ended(
    tasks: Sequence[asyncio.Task[None]], within_s: float, *, cancel: bool = False
) -> None:
    """Wait up to ``within_s`` for ``tasks`` to end (with ``cancel``, cancelled first and again
    every ``RECANCEL_S``); log those that did not (one that swallows every cancellation, a
    call that never returns) with where they wait."""
    if not tasks:
        return
    loop = asyncio.get_running_loop()
    until, stuck = loop.time() + within_s, set(tasks)
    step = RECANCEL_S if cancel else within_s
    while stuck and (left := until - loop.time()) > 0:
        for task in stuck if cancel else ():
            task.cancel()
        _, stuck = await asyncio.wait(stuck, timeout=min(left, step))
    for task in stuck:
        where = io.StringIO()
        task.print_stack(file=where)
        log.error(
            "%s had not ended %g s into the stop, which goes on without it. %s",
            task.get_name(),
            within_s,
            where.getvalue(),
        )


async def _patches(settings: Settings) -> Patches:
    """What PATCH /items set, as the store holds it now (or, while it is down, nothing until
    it answers: read again every PATCH_POLL_S)."""
    patches = Patches.of(_table(settings, "off", "switched-off"), _table(settings, "changes"))
    try:
        await patches.refresh()
    except StoreUnavailable as err:
        log.warning("starting without the items' changes: the store is down (%s)", err)
    return patches


async def _fill(
    store: ResilientStore,
    watch: EpochWatch | None,
    profiles: Mapping[str, Sequence[int]] | None,
    times: Mapping[str, Sequence[float]] | None,
) -> None:
    """The dataset's histories into the profile store: Redis once per data set (the watch),
    this process's store at every start."""
    try:
        if watch is not None:
            await watch.start()
        elif profiles:
            await store.load(profiles, times)
    except StoreUnavailable as err:  # serve degraded reads; the watch sets Redis up later
        log.warning("starting while Redis is down (%s): reads are degraded until it answers", err)


def _profile_store(
    settings: Settings,
    metrics: Metrics,
    profiles: Mapping[str, Sequence[int]] | None,
    times: Mapping[str, Sequence[float]] | None,
) -> tuple[ResilientStore, str, EpochWatch | None]:
    """Redis when configured (with the journal of acknowledged events and the watch that
    notices Redis back empty and refills it), else the in-process store; its name."""
    if not settings.redis_url:
        memory = MemoryProfileStore(
            max_users=settings.memory_store_max_users, on_evict=metrics.evictions.inc
        )
        return ResilientStore(memory, cache_size=0), "memory", None  # it never fails
    redis = RedisProfileStore.from_url(
        settings.redis_url,
        prefix=settings.redis_prefix,
        max_connections=settings.redis_max_connections,
        deadline_s=settings.redis_timeout_ms / 1000,
        write_deadline_s=settings.redis_write_timeout_ms / 1000,
        wait_replicas=settings.redis_wait_replicas,
        wait_timeout_ms=settings.redis_wait_timeout_ms,
    )
    journal = Journal(settings.journal_events)
    watch = EpochWatch(
        redis, histories=profiles, times=times, journal=journal, on_loss=metrics.data_losses.inc
    )
    store = ResilientStore(redis, cache_size=settings.profile_cache_size, journal=journal)
    return store, "redis", watch


def _keeping_current(
    settings: Settings,
    registry: Registry | None,
    items: Items,
    models: ModelSlot,
    catalogue: Catalogue,
    watch: EpochWatch | None,
    current: Current | None,
) -> list[asyncio.Task[None]]:
    """The tasks that run as long as the app: picking up other replicas' added items,
    following the registry, watching Redis's epoch."""
    tasks = [asyncio.create_task(items.keep_features(), name="items.keep_features")]
    if settings.items_sync_s:
        tasks.append(
            asyncio.create_task(
                _sync_items(items, models, catalogue, settings.items_sync_s), name="sync_items"
            )
        )
    if registry is not None:
        poll_s = settings.registry_poll_s
        following = _follow_registry(registry, models, current, poll_s)
        tasks.append(asyncio.create_task(following, name="follow_registry"))
    if watch is not None:
        tasks.append(asyncio.create_task(watch.run(EPOCH_CHECK_S), name="epoch_watch"))
    return tasks


def _items(settings: Settings) -> Items:
    """Where added items live: Redis when the profiles do, else a folder, else this process."""
    store: ItemStore
    if settings.redis_url:
        store = RedisItemStore.from_url(
            settings.redis_url,
            prefix=settings.redis_prefix,
            deadline_s=settings.redis_write_timeout_ms / 1000,
        )
    elif settings.items_dir is not None:
        store = DirectoryItemStore(settings.items_dir)
    else:
        store = MemoryItemStore()
    _, meta = load_features(settings.features)
    weights = settings.backbone_weights
    if weights is None and (settings.features / BACKBONE_FILE).is_file():
        weights = settings.features / BACKBONE_FILE  # the fitted backbone the grids were read by
    refusal = weights_refusal(meta.backbone, meta.weights_id, weights)
    if refusal is not None:
        log.warning("POST /items refuses new items: %s", refusal)
    return Items(
        store,
        backbone_name=meta.backbone,
        device=pick_device(settings.device),
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
        weights=weights,
        refusal=refusal,
    )


def _table(settings: Settings, name: str, file: str | None = None) -> ItemTable:
    """Where one table of what PATCH /items set is kept: beside the added items
    (``<prefix>:items:<name>`` in Redis, ``<file or name>.json`` beside a folder of items)."""
    if settings.redis_url:
        return RedisTable.from_url(
            settings.redis_url,
            key=f"{settings.redis_prefix}:items:{name}",
            deadline_s=settings.redis_write_timeout_ms / 1000,
        )
    if settings.items_dir is not None:
        return FileTable(settings.items_dir / f"{file or name}.json")
    return MemoryTable()


def _feedback_log(settings: Settings) -> FeedbackLog | None:
    """Where answers are kept for POST /feedback: beside the profiles (Redis, every replica
    sees them), else in this process; None when feedback is off."""
    window = settings.feedback_window_s
    if not window:
        return None
    if settings.redis_url:
        return RedisFeedback.from_url(
            settings.redis_url,
            prefix=settings.redis_prefix,
            window_s=window,
            deadline_s=settings.redis_write_timeout_ms / 1000,
        )
    return MemoryFeedback(window_s=window)


async def _sync_items(items: Items, slot: ModelSlot, catalogue: Catalogue, every_s: float) -> None:
    """Pick up items added by other replicas, for as long as the app runs."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await items.sync(slot, catalogue)
        except StoreUnavailable as err:
            log.warning("added items not synchronised this time: %s", err)


async def _follow_registry(
    registry: Registry, slot: ModelSlot, serving: Current | None, poll_s: float
) -> None:
    """Serve the registry's current version, through every publish and rollback."""

    async def load(checkpoint: Path, features: Path) -> None:
        while True:
            try:
                await slot.reload(checkpoint, features)
                return
            except ReloadBusy:  # an admin reload is running: ours comes after it
                await asyncio.sleep(0.5)

    await follow(registry, load, serving=serving, poll_s=poll_s, run=slot.run_experiment)

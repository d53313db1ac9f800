"""The one home of a serving engine, from files to a warmed engine and through every
replacement:

- **building** one: checkpoint + features -> model -> :class:`~service.model.serving.Serving`
  (ACF over its tables, or SASRec) -> :class:`~service.recommender.Recommender`, with the
  checkpoint's serving contract checked on the way (its features, its item order, the number
  of newest items it reads); the registry's current version or the configured files
  (:func:`start_source`);
- **device and threads**: :func:`open_slot` for a serving process, :func:`preload` for the
  process that loads the model before forking workers;
- **holding and replacing** it: the engine in use lives in a :class:`ModelSlot`; a reload
  (``POST /admin/reload``, SIGHUP, a registry publish) builds the next one on a worker thread,
  tries it on a query, then swaps it in with one assignment.

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
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.config import Settings
from service.errors import ServiceError
from service.index.item_index import IndexKind
from service.model.checkpoint import Checkpoint, CheckpointError, read_checkpoint
from service.model.feature_store import FeatureError, load_features
from service.model.sasrec import SASRec
from service.model.serving import SequenceServing, Serving, ServingModel
from service.model.tables import compute_tables, ensure_tables, tables_folder
from service.recommender import Query, Recommendation, Recommender
from service.registry import VERSION_CHARS, Current, Experiment, Registry
from service.runtime import pick_device
from service.store.profiles import MAX_RECENT

log = logging.getLogger("visrec.engine")


@dataclass(frozen=True)
class Source:
    """The files an engine is built from."""

    checkpoint: Path
    features: Path


def load_engine(source: Source, *, device: torch.device, index: IndexKind = "flat") -> Recommender:
    """The engine for ``source``, versioned ``<code version>/<checkpoint file's sha256>``.

    Its serving tables are memory-mapped from ``<features>/serving/<checkpoint digest>/``,
    written there by the first process that serves this checkpoint (computed in memory instead
    when the folder cannot be written); an approximate index is kept there too."""
    features, meta = load_features(source.features)
    ckpt, digest = read_checkpoint(source.checkpoint, map_location=device)
    if ckpt.profile_size > MAX_RECENT:
        raise CheckpointError(
            f"{source.checkpoint} reads a user's last {ckpt.profile_size} items, but the "
            f"profile store keeps {MAX_RECENT}: train it with profile_size <= {MAX_RECENT}"
        )
    ckpt.check_features(meta.inputs_hash, meta.item_ids)
    folder = tables_folder(source.features, digest)
    serving = _serving(ckpt, features, device=device, folder=folder)
    version = "/".join(filter(None, (ckpt.code_version, digest[:VERSION_CHARS])))
    return Recommender.from_checkpoint(
        ckpt, serving, index=index, index_cache=folder, version=version
    )


def build_engine(
    checkpoint: Checkpoint,
    features: np.ndarray,
    *,
    inputs_hash: str,
    item_ids: Sequence[int],
    device: torch.device,
    index: IndexKind = "flat",
    version: str = "",
) -> Recommender:
    """The engine for a checkpoint already in memory and the raw features it was trained on,
    with its tables in memory. ``version``: what answers name the model by (default: the
    checkpoint's code version)."""
    checkpoint.check_features(inputs_hash, item_ids)
    serving = _serving(checkpoint, features, device=device, folder=None)
    return Recommender.from_checkpoint(checkpoint, serving, index=index, version=version)


def _serving(
    ckpt: Checkpoint, features: np.ndarray, *, device: torch.device, folder: Path | None
) -> Serving:
    """SASRec over its embeddings; ACF over its tables, kept in ``folder`` (computed in memory
    without one), computed where it runs."""
    model = ckpt.serving_model().to(device)
    if isinstance(model, SASRec):
        return SequenceServing(model, device=device)
    projection = ckpt.feature_map
    tables = (
        compute_tables(model, features, projection)
        if folder is None
        else ensure_tables(folder, model, features, projection)
    )
    return ServingModel(model, tables, device=device, projection=projection)


def registry_of(settings: Settings) -> Registry | None:
    """The model registry the settings name, if any."""
    if settings.registry is None or settings.redis_url is None:
        return None
    return Registry(settings.registry, settings.redis_url, settings.redis_prefix)


def start_source(settings: Settings, registry: Registry | None) -> tuple[Source, Current | None]:
    """What a process serves at start: the ``registry``'s current version when there is one
    (and which generation that is), else the configured files."""
    found = registry.current_files() if registry else None
    if found is None:
        return Source(settings.checkpoint, settings.features), None
    current, checkpoint, features = found
    return Source(checkpoint, features), current


@dataclass(frozen=True)
class Preloaded:
    """An engine loaded before the process forked its workers (``visrec-serve --workers``)."""

    engine: Recommender
    source: Source
    serving: Current | None  # the registry's generation it is, if any


def preload(settings: Settings) -> Preloaded:
    """The start engine, loaded with one torch and one FAISS thread and no query answered, so
    that forked workers inherit no OpenMP thread pool (see :mod:`service.workers`)."""
    import faiss

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    source, serving = start_source(settings, registry_of(settings))
    engine = load_engine(source, device=pick_device(settings.device), index=settings.index)
    return Preloaded(engine, source, serving)


def open_slot(
    settings: Settings,
    finish: Callable[[Recommender], Recommender],
    source: Source,
    engine: Recommender | None = None,
) -> ModelSlot:
    """The slot serving ``source``, with every engine it loads (at start, on reload) passed
    through ``finish`` (which adds the items added while serving); ``engine``: the start one,
    already loaded.
    One query runs before the slot is returned, so the first request does not pay for lazy
    initialisation."""
    device = pick_device(settings.device)
    if device.type == "cpu":
        # A request's model work is a few small ops: extra intra-op threads only add hand-off
        # latency, and the web server needs the other cores.
        torch.set_num_threads(settings.cpu_threads)
    build = partial(load_engine, device=device, index=settings.index)

    def load(source: Source) -> Recommender:
        return finish(build(source))

    slot = ModelSlot(load(source) if engine is None else finish(engine), source, load)
    slot.warm_up()
    return slot


@dataclass(frozen=True)
class Swap:
    previous: str  # version that served before
    current: str  # version that serves now
    source: Source
    seconds: float  # to load and try the new engine


class ReloadRefused(ServiceError):
    """The model was not replaced; ``serving``: the version that still serves."""

    def __init__(self, reason: str, *, serving: str | None = None) -> None:
        super().__init__(reason)
        self.serving = serving

    def fields(self) -> dict[str, Any]:
        return {"model_version": self.serving}


class ReloadFailed(ReloadRefused):
    """The new engine could not be built; the old one still serves. The message says why."""

    status = 422
    code = "reload_failed"

    @property
    def detail(self) -> str:
        return f"the model was not replaced: {self}"


class ReloadBusy(ReloadRefused):
    """Another reload is running."""

    status = 409
    code = "reload_busy"


Loader = Callable[[Source], Recommender]


@dataclass(frozen=True)
class Trial:
    """A running experiment and the engine of each of its arms (the serving engine itself
    for an arm of the serving version)."""

    experiment: Experiment
    engines: dict[str, Recommender]


class ModelSlot:
    """The engine that serves now (and, during an experiment, its arms' engines), and the one
    way to replace them."""

    def __init__(self, engine: Recommender, source: Source, load: Loader) -> None:
        self.engine = engine
        self.source = source
        self.trial: Trial | None = None
        self._load = load
        self._reloading = asyncio.Lock()

    def recommend(self, queries: Sequence[Query]) -> list[Recommendation]:
        """The micro-batcher's function: the batch runs on the engines current when it starts;
        during an experiment each user's query on their arm's engine, the answer naming it."""
        engine, trial = self.engine, self.trial
        if trial is None:
            return engine.recommend(queries)
        arms = [trial.experiment.arm_of(q.user_id) for q in queries]
        answered: dict[int, Recommendation] = {}
        for arm in dict.fromkeys(arms):
            where = [i for i, a in enumerate(arms) if a == arm]
            answers = trial.engines[arm].recommend([queries[i] for i in where])
            for i, rec in zip(where, answers, strict=True):
                answered[i] = replace(rec, arm=trial.experiment.label(arm))
        return [answered[i] for i in range(len(queries))]

    def serving(self, user_id: str | None) -> tuple[Recommender, str]:
        """The engine that answers ``user_id`` now, and its arm's label ("": no experiment)."""
        trial = self.trial
        if trial is None:
            return self.engine, ""
        arm = trial.experiment.arm_of(user_id)
        return trial.engines[arm], trial.experiment.label(arm)

    async def run_experiment(
        self, experiment: Experiment | None, files: dict[str, tuple[Path, Path]]
    ) -> None:
        """Serve each arm of ``experiment`` its version (loaded off the event loop, with the
        items added while serving), or, for None, the serving engine to everyone again."""
        if experiment is None:
            self.trial = None
            log.info("no experiment runs: every user gets %s", self.engine.version)
            return
        async with self._reloading:
            engines = {}
            for arm, (checkpoint, features) in files.items():
                if checkpoint == self.source.checkpoint:
                    engines[arm] = self.engine
                else:
                    engines[arm] = await asyncio.to_thread(
                        self._build, Source(checkpoint, features)
                    )
            self.trial = Trial(experiment, engines)
        log.info("experiment %s runs: %s", experiment.id, dict(experiment.arms))

    async def reload(self, checkpoint: Path | None = None, features: Path | None = None) -> Swap:
        """Build an engine from the given files (default: those of the serving engine, read
        again) off the event loop and swap it in. Raises ReloadBusy while another reload runs
        and ReloadFailed, the old engine still serving, when the new one cannot be built."""
        if self._reloading.locked():
            raise ReloadBusy(
                "another reload is running; retry when it has finished", serving=self.engine.version
            )
        async with self._reloading:
            source = Source(checkpoint or self.source.checkpoint, features or self.source.features)
            start = time.perf_counter()
            try:
                engine = await asyncio.to_thread(self._build, source)
            except Exception as err:  # whatever it was, the old engine keeps serving
                log.warning("reload of %s failed: %s", source.checkpoint, err)
                raise ReloadFailed(_reason(err), serving=self.engine.version) from err
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
            trial = self.trial
            if trial is not None:  # the arms' engines get the change too
                changed = {
                    arm: engine if e is self.engine else await asyncio.to_thread(change, e)
                    for arm, e in trial.engines.items()
                }
                trial = Trial(trial.experiment, changed)
            self.engine, self.trial = engine, trial
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

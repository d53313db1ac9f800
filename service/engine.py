"""Where a serving engine is built from files, for start-up, `/admin/reload` and SIGHUP, and
for the process that loads the model before forking workers: checkpoint + features -> model
-> :class:`~service.model.serving.Serving` (ACF over its tables, or SASRec) ->
:class:`~service.recommender.Recommender`, with the checkpoint's serving contract checked on the
way (its features, its item order, the number of newest items it reads)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from service.config import Settings
from service.index.item_index import IndexKind
from service.model.checkpoint import Checkpoint, CheckpointError, read_checkpoint
from service.model.feature_store import load_features
from service.model.sasrec import SASRec
from service.model.serving import SequenceServing, Serving, ServingModel
from service.model.tables import compute_tables, ensure_tables, tables_folder
from service.recommender import Recommender
from service.registry import VERSION_CHARS, Current, Registry
from service.runtime import pick_device
from service.store.profiles import MAX_RECENT


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


def start_source(settings: Settings) -> tuple[Source, Current | None]:
    """What a process serves at start: the registry's current version when there is one (and
    which generation that is), else the configured files."""
    registry = registry_of(settings)
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
    source, serving = start_source(settings)
    engine = load_engine(source, device=pick_device(settings.device), index=settings.index)
    return Preloaded(engine, source, serving)

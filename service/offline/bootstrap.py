"""What ``visrec-serve`` needs that may not exist yet, made on a first start: the synthetic world
when no dataset is given, the item features, and a checkpoint (the one ``visrec reproduce``
chose to serve, else the plan's first-start row trained here); and the dataset's histories as
the profile store takes them. The training stack is imported only when there is something to
train, so a start with a checkpoint stays light."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

from service.model.checkpoint import SERVED_FILE, load_checkpoint
from service.model.feature_store import FeatureError, load_features
from service.offline.data.dataset import Dataset, load_dataset
from service.offline.data.features import extract_features

if TYPE_CHECKING:
    from service.offline.training.config import TrainConfig

log = logging.getLogger("visrec.serve")
T = TypeVar("T")


def histories(dataset: Dataset) -> dict[str, list[int]]:
    """Every user's raw item ids, oldest first (ties in file order)."""
    return _per_user(dataset, dataset.item_ids[dataset.items - 1].tolist())


def history_times(dataset: Dataset) -> dict[str, list[float]]:
    """When each item of :func:`histories` came, seconds since the epoch."""
    return _per_user(dataset, dataset.timestamps.astype(float).tolist())


def _per_user(dataset: Dataset, values: list[T]) -> dict[str, list[T]]:
    """``values`` (one per interaction) per user, oldest first (ties in file order)."""
    order = np.lexsort((np.arange(len(dataset.users)), dataset.timestamps, dataset.users))
    out: dict[str, list[T]] = {}
    for u, j in zip(dataset.users[order].tolist(), order.tolist(), strict=True):
        out.setdefault(str(dataset.user_ids[u]), []).append(values[j])
    return out


def prepare_serving(
    data: Path | None, work: Path, device: torch.device, epochs: int | None = None
) -> tuple[Dataset, Path, Path]:
    """(dataset, features folder, checkpoint), building whatever does not exist yet. The
    checkpoint is the one `visrec reproduce` chose to serve when it ran on this data, else the
    plan's first-start row (:func:`first_start_config`; trained here when missing: a training
    run that was interrupted is resumed where it stopped, not started over)."""
    dataset = dataset_of(data, work)
    data = dataset.root
    run_dir = work / data.resolve().name
    features, checkpoint = run_dir / "features-efficientnet_lite0", run_dir / "acf.pt"
    served = run_dir / SERVED_FILE
    trained_on = _features_of(served, run_dir) if served.is_file() else None
    if trained_on is not None:  # e.g. those of a backbone `visrec reproduce` fitted (adapt)
        features = trained_on
    else:
        ids, paths = dataset.item_ids.tolist(), list(dataset.image_paths)
        extract_features(ids, paths, features, device=device)
    if served.is_file():
        log.info("serving %s, the row `visrec reproduce` chose on validation", served)
        return dataset, features, served
    if not checkpoint.is_file():
        _train(data, features, checkpoint, device, epochs)
    return dataset, features, checkpoint


def _features_of(checkpoint: Path, run_dir: Path) -> Path | None:
    """The complete folder of features in ``run_dir`` that ``checkpoint`` was trained on."""
    wanted = load_checkpoint(checkpoint).features.get("inputs_hash")
    for folder in sorted(run_dir.glob("features-*")):
        try:
            if load_features(folder)[1].inputs_hash == wanted:
                return folder
        except FeatureError:  # another extraction, or one that did not finish
            continue
    return None


def dataset_of(data: Path | None, work: Path) -> Dataset:
    """The dataset in ``data``, or without one the synthetic world in ``work/world`` (made
    there the first time)."""
    if data is None:
        data = work / "world"
        if not (data / "items.csv").is_file():
            _make_default_world(data)
    return load_dataset(data)


def _make_default_world(data: Path) -> None:
    from service.offline.data.synthetic import WorldSpec, make_world

    log.info("no DATA given: generating the synthetic visual world in %s", data)
    # users go through runs of one shape, mostly their favourite, so both the image (which
    # shape) and the order (which run) matter; see service/offline/data/synthetic.py
    make_world(
        data,
        WorldSpec(n_users=300, n_items=400, interactions_per_user=30, taste=0.7, run_length=4.0),
    )


def _train(
    data: Path, features: Path, checkpoint: Path, device: torch.device, epochs: int | None
) -> None:
    """Train the plan's first-start row (the training stack is imported only here): with the
    settings tuned on this data when a plan was, else the default plan's."""
    from service.model.checkpoint import save_checkpoint
    from service.offline.training.pipeline import fit, prepare, to_checkpoint, training_state_path

    prepared = prepare(data, features)
    name, config = first_start_config(data, checkpoint.parent, prepared.dataset.tags)
    if epochs is not None:
        config = replace(config, epochs=epochs)
    log.info(
        "no checkpoint at %s: training the plan's row %s (up to %d epochs)",
        checkpoint,
        name,
        config.epochs,
    )
    state = training_state_path(checkpoint)
    result = fit(prepared, config, device=device, state_path=state, resume=True)
    save_checkpoint(checkpoint, to_checkpoint(prepared, result, config))
    state.unlink()


def first_start_config(
    data: Path, run_dir: Path, tags: Sequence[frozenset[str]]
) -> tuple[str, TrainConfig]:
    """The row a first start on ``data`` trains, and its settings: the plan tuned on this data
    (``visrec tune``), else the default plan (its settings chosen elsewhere, said in the log),
    else ``TrainConfig()`` when there is no plan file at all (an installed package)."""
    from service.offline.experiments.plan import DEFAULT_PLAN, load_plan
    from service.offline.experiments.tune import plan_for

    path = plan_for(data, run_dir, DEFAULT_PLAN)
    if path is None and DEFAULT_PLAN.is_file():
        path = DEFAULT_PLAN
        log.info("no plan was tuned on %s: the settings of %s are used", data, path)
    row = load_plan(path).first_start_row(tags)
    return row.name, row.config

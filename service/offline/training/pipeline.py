"""The offline steps glued together: dataset + features -> trained models -> checkpoint."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from service.model.acf import ACF
from service.model.checkpoint import SERVED, Checkpoint, code_version
from service.model.feature_store import FeatureMeta, load_features
from service.model.projection import Projection, fit_projection
from service.model.sasrec import SASRec
from service.offline.data.dataset import Dataset, Split, leave_last_out, load_dataset
from service.offline.data.sampling import build_samples
from service.offline.evaluation.attention import attention_probe
from service.offline.evaluation.evaluate import validation_task
from service.offline.training.config import TrainConfig
from service.offline.training.train import TrainResult, as_scored, build_model, train

log = logging.getLogger(__name__)


class PipelineError(ValueError):
    """Inputs that don't fit together (features of another dataset, an empty split, ...)."""


@dataclass(frozen=True)
class Prepared:
    dataset: Dataset
    split: Split
    features: np.ndarray  # (N, K, C) float16, memory-mapped
    meta: FeatureMeta


def prepare(data_dir: Path, features_dir: Path) -> Prepared:
    """Load the dataset, split it and load features that must match its items."""
    dataset = load_dataset(data_dir)
    features, meta = load_features(features_dir)
    if list(meta.item_ids) != dataset.item_ids.tolist():
        raise PipelineError(
            f"features in {features_dir} were extracted for {len(meta.item_ids)} items that "
            f"are not the {dataset.n_items} items of {data_dir} in the same order; "
            "re-run `visrec features` on this dataset"
        )
    split = leave_last_out(dataset)
    if len(split.train_users) == 0:
        raise PipelineError(f"{data_dir}: the training split is empty")
    if len(split.val_users) == 0:
        raise PipelineError(
            f"{data_dir}: no user has 3 or more interactions, so there is no "
            "validation split to select the best epoch with"
        )
    return Prepared(dataset, split, features, meta)


def fit(
    prepared: Prepared,
    config: TrainConfig,
    *,
    device: torch.device,
    progress: bool = True,
    state_path: Path | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train ``config.model`` on the training split, selecting epochs on validation; with a
    ``state_path``, the run can be resumed (see :func:`~service.offline.training.train.train`)."""
    split = prepared.split
    samples = build_samples(
        split.train_sequences(),
        n_items=split.n_items,
        profile_size=config.profile_size,
        times=split.train_time_sequences(),
    )
    projection = feature_projection(prepared.features, config)
    features = prepared.features if projection is None else projection.apply(prepared.features)
    model = build_model(config, split, features, prepared.dataset.tags)
    validation = [
        validation_task(split, protocol, profile_size=config.profile_size)
        for protocol in ("standard", "seed")
    ]
    # Its own generator, so the probe leaves the training shuffles as they were.
    probe = attention_probe(validation[0], np.random.default_rng([config.seed, 1]))
    result = train(
        model,
        samples,
        validation,
        config,
        device=device,
        rng=np.random.default_rng(config.seed),
        probe=probe,
        progress=progress,
        state_path=state_path,
        resume=resume,
    )
    return replace(result, projection=projection)


def training_state_path(checkpoint: Path) -> Path:
    """Where a run that will write ``checkpoint`` keeps its state between epochs."""
    return checkpoint.with_suffix(".state.pt")


def feature_projection(features: np.ndarray, config: TrainConfig) -> Projection | None:
    """ACF's fixed feature map (see :mod:`service.model.projection`), or None for raw features
    (and for every other model)."""
    if config.model != "acf" or not (config.centre_components or config.feature_rank):
        return None
    return fit_projection(
        features,
        per_component=config.centre_components,
        rank=config.feature_rank or None,
        generator=np.random.default_rng([config.seed, 2]),
    )


def to_checkpoint(prepared: Prepared, result: TrainResult, config: TrainConfig) -> Checkpoint:
    """The run as the service serves it: read as `standard` validation chose (without ACF's
    user embeddings where they ranked worse there; see :func:`as_scored`)."""
    model = as_scored(result.model, result.validation, "standard")
    if not isinstance(model, ACF | SASRec):
        raise PipelineError(
            f"{config.model} is for comparison only: the served models are {', '.join(SERVED)}"
        )
    meta = prepared.meta
    counts = np.bincount(prepared.split.train_items, minlength=prepared.split.n_items + 1)
    return Checkpoint(
        config=model.config,
        state={k: v.detach().cpu() for k, v in model.state_dict().items()},
        user_ids=prepared.dataset.user_ids.tolist(),
        item_ids=prepared.dataset.item_ids.tolist(),
        features={
            "backbone": meta.backbone,
            "input_size": meta.input_size,
            "feature_dim": meta.feature_dim,
            "inputs_hash": meta.inputs_hash,
        },
        item_popularity=counts[1:].tolist(),
        train_config=asdict(config),
        validation=result.validation,
        history=result.history,
        code_version=code_version(),
        projection=None if result.projection is None else result.projection.as_state(),
        model=config.model,
    )

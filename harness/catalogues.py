"""The catalogues a benchmark or a test serves: a dataset's, trained as `visrec-serve` trains
it, a synthetic one of any size (random features and a randomly initialised ACF), or the
trained million-item one `benchmarks/million.py` builds."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from service.config import Settings
from service.model.acf import ACF, ACFConfig
from service.model.checkpoint import Checkpoint, save_checkpoint
from service.model.feature_store import FEATURES_FILE, META_FILE, PROGRESS_FILE, FeatureMeta


@dataclass(frozen=True)
class Catalogue:
    name: str
    settings: Settings
    histories: dict[str, list[int]]


def dataset_catalogue(data: Path, work: Path) -> Catalogue:
    from service.offline.bootstrap import histories, prepare_serving

    dataset, features, checkpoint = prepare_serving(data, work, torch.device("cpu"))
    settings = Settings(
        checkpoint=checkpoint,
        features=features,
        device="cpu",
        environment="development",
        rate_limit_per_s=0,
    )
    return Catalogue(data.resolve().name, settings, histories(dataset))


def synthetic_catalogue(
    n_items: int, work: Path, *, n_users: int = 10_000, dim: int = 64
) -> Catalogue:
    """A randomly initialised ACF over ``n_items`` random feature grids. Serving cost does not
    depend on the raw feature width once tables are precomputed, so C = 64 keeps it in memory."""
    folder = work / f"synthetic-{n_items}"
    rng = np.random.default_rng(0)
    meta = FeatureMeta("random", 0, dim, 7, list(range(1, n_items + 1)), f"random-{n_items}")
    if not (folder / "acf.pt").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        array = np.lib.format.open_memmap(
            folder / FEATURES_FILE, mode="w+", dtype=np.float16, shape=meta.shape
        )
        for start in range(0, n_items, 10_000):
            rows = array[start : start + 10_000]
            rows[:] = rng.standard_normal(rows.shape, dtype=np.float32)
        array.flush()
        (folder / META_FILE).write_text(meta.to_json())
        (folder / PROGRESS_FILE).write_text(
            json.dumps({"inputs_hash": meta.inputs_hash, "rows_done": n_items})
        )
        config = ACFConfig(
            n_users=n_users, n_items=n_items, feature_dim=dim, item_bias=True, score_scale=1.0
        )
        torch.manual_seed(0)
        model = ACF(config, torch.zeros(n_items, 49, dim))  # features are not in the state
        save_checkpoint(
            folder / "acf.pt",
            Checkpoint(
                config=config,
                state=model.state_dict(),
                user_ids=list(range(n_users)),
                item_ids=meta.item_ids,
                features={"inputs_hash": meta.inputs_hash, "backbone": "random"},
                item_popularity=rng.integers(0, 1000, n_items).tolist(),
            ),
        )
    histories = {
        str(u): (rng.choice(n_items, size=30, replace=False) + 1).tolist() for u in range(n_users)
    }
    settings = Settings(
        checkpoint=folder / "acf.pt",
        features=folder,
        device="cpu",
        environment="development",
        rate_limit_per_s=0,
    )
    return Catalogue(f"synthetic {n_items:,} items", settings, histories)


def trained_catalogue(work: Path) -> Catalogue:
    """What ``benchmarks/million.py`` built and trained in ``work`` (``acf.pt``, its features,
    ``histories.json``), served on the GPU when there is one, as that benchmark serves it."""
    settings = Settings(
        checkpoint=work / "acf.pt",
        features=work,
        device="auto",
        environment="development",
        rate_limit_per_s=0,
    )
    return Catalogue(work.name, settings, json.loads((work / "histories.json").read_text()))
